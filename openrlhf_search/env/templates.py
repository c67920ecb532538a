"""Prompt templates: the instructions the model sees, how observations are wrapped, and when generation stops.

Two protocols, each a registered :class:`PromptTemplate` (``search_r1_compact`` is ``search_r1`` with a one-line
instruction, for the quickstart's tiny model):

* ``search_r1`` (protocol ``tags``): the Search-R1 tag protocol (Jin et al., 2025, arXiv 2503.09516), instructions
  written in our own words. The model thinks in ``<think>``, searches with ``<search> query </search>``, reads
  results the environment inserts as ``<information> ... </information>`` in the *same* assistant message, and ends
  with ``<answer> ... </answer>``. Generation stops at ``</search>`` or ``</answer>`` (or EOS).
* ``qwen_tools`` (protocol ``tool_call``): Qwen-style JSON tool calls. The system prompt describes a ``search``
  function; the model writes ``<tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>``, ends its
  turn, and the results come back in a user turn as ``<tool_response> ... </tool_response>`` (Qwen2.5's chat
  layout for tool results). The final answer still goes in ``<answer>``. Stops at ``</tool_call>``/``</answer>``.
  The observation wrapper writes ChatML turn markers (``<|im_start|>``/``<|im_end|>``) itself, so this template
  is for ChatML models (Qwen2/2.5/3, SmolLM2, our tiny tokenizer); for other chat formats override ``obs_prefix``,
  ``obs_suffix``, ``close_turn`` and ``invalid_feedback`` (``get_template("qwen_tools", obs_prefix=...)``).

* ``smollm2_search`` and ``smollm2_direct`` (protocol ``tags``): for SmolLM2-135M-Instruct (the real-data
  quickstart): a system message of our own, which keeps SmolLM2's chat template from inserting its default one, and
  a strict instruction (search, then answer; ``smollm2_direct``: answer only, the closed-book baseline).

* ``qwen3_think`` (protocol ``tags``) and ``qwen3_tools`` (protocol ``tool_call``): Qwen3-style thinking, each turn
  ``<think>...</think>`` then an action. ``qwen3_tools`` renders tool results as a ``tool`` message through the
  tokenizer's *own* chat template (``obs_role``; the token delta the template adds, :mod:`openrlhf_search.env.chat`),
  so it fits any chat format whose template knows a tool role (SmolLM2's generic ChatML writes ``<|im_start|>tool``,
  Qwen3's wraps it in ``<tool_response>`` inside a user turn). Both ask the template for ``enable_thinking=True``.

No instruction, corrective message or hint holds a complete action: a tag is named as an empty pair
(``inside <search></search>``) and examples stay outside the tags, because a model that copies its prompt would
otherwise act on the example (search for "and" from "between <search> and </search>", answer "Paris"). A template
whose texts hold a complete pair with a non-blank body is refused when built (:meth:`PromptTemplate.example_pairs`).

A user template file (``get_template("path/to/prompt.txt")``) replaces the user message of the ``search_r1``
template: plain text with a ``{question}`` placeholder, or a Jinja file (``.jinja``/``.j2``) given ``question``.

Prompts go through the tokenizer's chat template when it has one (``apply_chat_template(...,
add_generation_prompt=True)``), else a plain-text fallback ``system\\n\\nuser\\n``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from openrlhf_search.env.protocol import action_pairs, tag_names
from openrlhf_search.env.tools import get_tools
from openrlhf_search.registry import Registry

__all__ = ["PromptTemplate", "TEMPLATES", "register_template", "get_template", "available_templates",
           "load_template_file", "with_tools", "env_template", "COMPACT_USER"]


@dataclass(frozen=True)
class PromptTemplate:
    """Everything protocol-specific the environment needs; no logic beyond string rendering."""

    name: str
    """Registry name (or the file path for user templates)."""
    protocol: str
    """``tags`` (``<search>``/``<information>``) or ``tool_call`` (``<tool_call>`` JSON / ``<tool_response>``)."""
    user: str
    """User message with a ``{question}`` placeholder (replaced literally, other braces are left alone)."""
    system: str | None = None
    """Optional system message."""
    stop: tuple[str, ...] = ("</search>", "</answer>")
    """Stop strings for every generation (the engine's EOS is added by the engine)."""
    obs_prefix: str = "\n\n<information>"
    """Text inserted before the retrieved documents."""
    obs_suffix: str = "</information>\n\n"
    """Text inserted after the retrieved documents."""
    close_turn: str = ""
    """Prepended to an observation when the model's turn did not already end with EOS (tool protocol: ``<|im_end|>``
    followed by a newline, so the tool result sits in its own chat turn)."""
    invalid_feedback: str = (
        "\n\nThat was not a valid action. To search, write your query inside <search></search>. "
        "To finish, write only the final answer inside <answer></answer>.{hint}\n\n"
    )
    """The fixed corrective observation for an invalid action (as in Search-R1, in our own words); ``{hint}`` is
    replaced by the last-turn hint (or nothing). Like every instruction it names the tags as empty pairs, never
    around an example (see :meth:`example_pairs`)."""
    last_turn_hint: str = "No searches are left: give your final answer now."
    """Shown before the last turn when search is forbidden on the last turn (after the documents, or in the
    corrective message)."""
    jinja: bool = False
    """Render ``user`` with Jinja (``{{ question }}``) instead of the literal ``{question}`` replacement."""
    use_chat_template: bool = True
    """Use the tokenizer's chat template when it has one (else always the plain-text fallback)."""
    obs_role: str | None = None
    """Render observations with the tokenizer's chat template as a message of this role (``tool``): the wrapper is
    the template's own delta (:func:`openrlhf_search.env.chat.chat_observation_format`), measured when the
    environment is built. None, or a tokenizer without a chat template: the literal ``obs_prefix``/``obs_suffix``."""
    feedback_message: str | None = None
    """With ``obs_role``: the corrective message (with ``{hint}``) rendered as an ``obs_role`` message."""
    chat_kwargs: tuple[tuple[str, object], ...] = ()
    """Extra ``apply_chat_template`` arguments as ``(name, value)`` pairs (``(("enable_thinking", True),)``)."""

    def __post_init__(self) -> None:
        if self.protocol not in ("tags", "tool_call"):
            raise ValueError(f"template {self.name!r}: protocol must be 'tags' or 'tool_call', got {self.protocol!r}")
        pairs = self.example_pairs()
        if pairs:
            raise ValueError(
                f"template {self.name!r}: its instructions hold the complete action {pairs[0]!r}; a model that copies "
                "the prompt would run it (name a tag as an empty pair such as <search></search>, and give examples "
                "outside the tags)")

    def example_pairs(self) -> list[str]:
        """Complete action pairs with a non-blank body in the instructions and corrective messages (must be none: a
        model echoing the prompt would otherwise search for the example or answer it)."""
        names = [n for n in tag_names() if n not in ("think", "information", "tool_response")]
        texts = [self.system or "", self.user, self.invalid_feedback, self.feedback_message or "", self.last_turn_hint]
        return [p for t in texts for p in action_pairs(t, names)]

    def user_message(self, question: str) -> str:
        """The user message for ``question``."""
        if self.jinja:
            import jinja2

            return jinja2.Template(self.user, keep_trailing_newline=True).render(question=question)
        return self.user.replace("{question}", question)

    def messages(self, question: str) -> list[dict]:
        """Chat messages (system if any, then user)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.user_message(question)}]

    def render(self, question: str, tokenizer=None) -> str:
        """The prompt text the first generation continues (chat template + generation prompt when available)."""
        if self.use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template(self.messages(question), tokenize=False, add_generation_prompt=True,
                                                **dict(self.chat_kwargs))
            if not isinstance(out, str):
                raise TypeError(f"template {self.name!r}: apply_chat_template returned {type(out).__name__}, not str")
            return out
        parts = ([self.system] if self.system else []) + [self.user_message(question)]
        return "\n\n".join(parts) + "\n"

    def wrap_observation(self, body: str, turn_ended: bool = True, hint: bool = False) -> str:
        """Wrap formatted documents; ``turn_ended=False`` prepends :attr:`close_turn` (tool protocol) and ``hint``
        appends :attr:`last_turn_hint` on its own line after the documents."""
        extra = "\n" + self.last_turn_hint if hint else ""
        return ("" if turn_ended else self.close_turn) + self.obs_prefix + body + extra + self.obs_suffix

    def with_chat_format(self, fmt) -> PromptTemplate:
        """This template with the observation wrapper a :class:`~openrlhf_search.env.chat.ChatObservationFormat`
        measured (close turn, prefix, suffix; the corrective message wrapped the same way)."""
        msg = self.feedback_message if self.feedback_message is not None else self.invalid_feedback
        return replace(self, obs_prefix=fmt.prefix, obs_suffix=fmt.suffix, close_turn=fmt.close_turn,
                       invalid_feedback=fmt.prefix + msg + fmt.suffix)

    def feedback(self, turn_ended: bool = True, hint: bool = False) -> str:
        """The corrective observation for an invalid action (with the last-turn hint when ``hint``)."""
        msg = self.invalid_feedback.replace("{hint}", " " + self.last_turn_hint if hint else "")
        return ("" if turn_ended else self.close_turn) + msg


TEMPLATES: Registry[Callable[[], PromptTemplate]] = Registry("prompt template")
"""Zero-argument template factories by name (all built-ins are registered in this module, so every process that
imports the environment, vLLM rollout actors included, resolves the same names)."""


def register_template(name: str):
    """Register a zero-argument template factory under ``name`` (registering twice raises ``KeyError``)."""
    return TEMPLATES.register(name)


def available_templates() -> list[str]:
    """Registered template names."""
    return TEMPLATES.names()


SEARCH_R1_USER = (
    "Answer the question below. Reason step by step inside <think></think> whenever you need to. "
    "If a fact is missing, look it up by writing a search query inside <search></search>; the results "
    "will be shown to you inside <information></information>. You may search several times. "
    "When you are sure, write only the final answer inside <answer></answer>: a few words, such as a name or a "
    "year, with no explanation.\n"
    "Question: {question}\n"
)


@register_template("search_r1")
def _search_r1() -> PromptTemplate:
    return PromptTemplate(name="search_r1", protocol="tags", user=SEARCH_R1_USER)


QWEN_TOOLS_SYSTEM = (
    "You answer questions with the help of a search engine.\n\n"
    "# Tools\n\nYou may call the function below. Its signature is given as JSON inside <tools></tools>:\n"
    '<tools>\n{"type": "function", "function": {"name": "search", "description": "Search a text collection and '
    'return the best matching passages.", "parameters": {"type": "object", "properties": {"query": {"type": '
    '"string", "description": "what to look for"}}, "required": ["query"]}}}\n</tools>\n\n'
    "To call it, write a JSON object with the function name and its arguments, such as "
    '{"name": "search", "arguments": {"query": "..."}}, inside <tool_call></tool_call>.\n'
    "The results come back inside <tool_response></tool_response>. Think inside <think></think> when useful. "
    "Once you know the answer, write only the answer inside <answer></answer>."
)


@register_template("qwen_tools")
def _qwen_tools() -> PromptTemplate:
    return PromptTemplate(
        name="qwen_tools",
        protocol="tool_call",
        system=QWEN_TOOLS_SYSTEM,
        user="Question: {question}",
        stop=("</tool_call>", "</answer>"),
        obs_prefix="<|im_start|>user\n<tool_response>\n",
        obs_suffix="\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        close_turn="<|im_end|>\n",
        invalid_feedback=(
            '<|im_start|>user\nThat was not a valid action. To search, write {"name": "search", "arguments": '
            '{"query": "..."}} inside <tool_call></tool_call>. To finish, write only the final answer inside '
            "<answer></answer>.{hint}<|im_end|>\n<|im_start|>assistant\n"
        ),
    )


QWEN3_THINK_USER = (
    "Answer the question below. Each turn, first reason inside <think></think>, then do exactly one of two "
    "things: look something up by writing a search query inside <search></search> (the results will be shown "
    "to you inside <information></information>), or, when you are sure, write only the final answer inside "
    "<answer></answer>: a few words, such as a name or a year, with no explanation.\n"
    "Question: {question}\n"
)


@register_template("qwen3_think")
def _qwen3_think() -> PromptTemplate:
    """Qwen3-style thinking with the Search-R1 tags: ``<think>...</think>`` then ``<search>`` or ``<answer>``; the
    chat template is asked for thinking mode (``enable_thinking=True``: Qwen3 templates then leave the generation
    prompt open instead of pre-filling an empty ``<think></think>``)."""
    return PromptTemplate(name="qwen3_think", protocol="tags", user=QWEN3_THINK_USER,
                          chat_kwargs=(("enable_thinking", True),))


QWEN3_TOOLS_SYSTEM = QWEN_TOOLS_SYSTEM.replace(
    "The results come back inside <tool_response></tool_response>. Think inside <think></think> when useful. "
    "Once you know the answer, write only the answer inside <answer></answer>.",
    "Each turn, first reason inside <think></think>, then either call the function once or, when you are sure, "
    "write only the final answer inside <answer></answer>. The function's results come back to you as a "
    "tool message.")

QWEN3_FEEDBACK = (
    'That was not a valid action. To search, write {"name": "search", "arguments": {"query": "..."}} inside '
    "<tool_call></tool_call>. To finish, write only the final answer inside <answer></answer>.{hint}"
)


@register_template("qwen3_tools")
def _qwen3_tools() -> PromptTemplate:
    """Qwen3-style thinking with native tool calls: the results are a ``tool`` message rendered by the tokenizer's
    own chat template (:mod:`openrlhf_search.env.chat`); without a chat template, ``qwen_tools``' ChatML wrapper."""
    base = _qwen_tools()
    return replace(base, name="qwen3_tools", system=QWEN3_TOOLS_SYSTEM, obs_role="tool",
                   feedback_message=QWEN3_FEEDBACK, chat_kwargs=(("enable_thinking", True),))


COMPACT_USER = "Search inside <search></search>, answer inside <answer></answer>.\nQuestion: {question}\n"
"""The one-line instruction of ``search_r1_compact``."""


@register_template("search_r1_compact")
def _search_r1_compact() -> PromptTemplate:
    """``search_r1`` with a one-line instruction: the quickstart's tiny model is trained from scratch and cannot read
    instructions, while every prompt token costs compute (the full instruction is ~115 tiny-tokenizer tokens, about
    40% of a demonstration). Same stops, observation wrapping and answer format."""
    return replace(_search_r1(), name="search_r1_compact", user=COMPACT_USER)


SMOLLM2_SYSTEM = "You answer questions by searching Wikipedia."
"""The system message of the ``smollm2_*`` templates: SmolLM2's chat template writes its own default system prompt
("You are a helpful AI assistant named SmolLM, ...") whenever the conversation has none, so they always give one."""

SMOLLM2_SEARCH_USER = (
    "Do not explain. First write a search query inside <search></search>. The Wikipedia passages will be shown "
    "inside <information></information>. Then write only the answer, a few words copied from a passage, inside "
    "<answer></answer>.\n"
    "Question: {question}\n"
)
"""The user message of ``smollm2_search``: a strict two-step instruction (search, then answer) for a 135M model
that otherwise writes numbered steps outside the tags."""


@register_template("smollm2_search")
def _smollm2_search() -> PromptTemplate:
    """The tag protocol for SmolLM2-135M-Instruct (the real-data quickstart): a short system message of our own
    (never SmolLM's default one), a strict search-then-answer instruction, ``search_r1``'s stops and wrapping."""
    return replace(_search_r1(), name="smollm2_search", system=SMOLLM2_SYSTEM, user=SMOLLM2_SEARCH_USER)


SMOLLM2_DIRECT_USER = (
    "Do not explain. Write only the answer, a few words, inside <answer></answer>.\n"
    "Question: {question}\n"
)
"""The user message of ``smollm2_direct``: the closed-book baseline (answer from memory, no search)."""


@register_template("smollm2_direct")
def _smollm2_direct() -> PromptTemplate:
    """Closed-book answering for SmolLM2 (``env.max_turns: 1``): the baseline the search agent must beat."""
    return replace(_search_r1(), name="smollm2_direct", system=SMOLLM2_SYSTEM, user=SMOLLM2_DIRECT_USER)


def with_tools(tpl: PromptTemplate, tools) -> PromptTemplate:
    """``tpl`` told about every tool beyond ``search`` (which the built-in instructions describe).

    ``tags``: each extra tool's :attr:`~openrlhf_search.env.tools.Tool.instruction` goes before the ``Question:``
    line of the user message (or at its start). ``tool_call``: each extra tool's JSON schema joins the system
    prompt's ``<tools>`` block. Stop strings gain each tool's closing tag (``tags``). Templates are otherwise
    unchanged, so an environment with ``tools=["search"]`` renders exactly what it always did.
    """
    extra = [t for t in tools if t.name != "search"]
    if not extra:
        return tpl
    if tpl.protocol == "tags":
        lines = " ".join(t.instruction for t in extra if t.instruction)
        user = tpl.user
        at = user.find("Question:")
        user = (user[:at] + lines + "\n" + user[at:]) if at >= 0 else lines + "\n" + user
        stop = tuple(dict.fromkeys(tpl.stop + tuple(f"</{t.name}>" for t in extra)))
        return replace(tpl, user=user, stop=stop)
    schemas = "".join("\n" + json.dumps(t.schema()) for t in extra)
    system = tpl.system or ""
    system = system.replace("\n</tools>", schemas + "\n</tools>", 1) if "\n</tools>" in system else (
        system + "\n\nMore functions:<tools>" + schemas + "\n</tools>")
    return replace(tpl, system=system)


def env_template(name: str | PromptTemplate, cfg) -> PromptTemplate:
    """The template an environment with config ``cfg`` uses: :func:`get_template` + :func:`with_tools` of
    ``cfg.tools`` (what ``Episode`` renders; the OpenRLHF launcher writes its prompts with it too)."""
    return with_tools(get_template(name), get_tools(cfg.tools, cfg))


def load_template_file(path: str | Path, base: str = "search_r1") -> PromptTemplate:
    """A user template file replacing the user message of template ``base``.

    ``.jinja`` / ``.j2`` files are rendered with Jinja and receive ``question``; other files are plain text with a
    literal ``{question}`` placeholder. Raises ``ValueError`` naming the file if the placeholder is missing.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt template file not found: {p}")
    text = p.read_text(encoding="utf-8")
    is_jinja = p.suffix in (".jinja", ".j2")
    if is_jinja and "question" not in text:
        raise ValueError(f"{p}: Jinja prompt template never uses the variable 'question'")
    if not is_jinja and "{question}" not in text:
        raise ValueError(f"{p}: prompt template has no '{{question}}' placeholder")
    return replace(get_template(base), name=str(p), user=text, jinja=is_jinja)


def get_template(name: str | PromptTemplate, **overrides) -> PromptTemplate:
    """A registered template by name, a template file by path, or a given template; ``overrides`` replace fields."""
    if isinstance(name, PromptTemplate):
        tpl = name
    elif name in TEMPLATES:
        tpl = TEMPLATES.get(name)()
    elif Path(name).suffix or "/" in name:
        tpl = load_template_file(name)
    else:
        raise KeyError(f"unknown prompt template {name!r}; valid: {available_templates()} or a template file path")
    return replace(tpl, **overrides) if overrides else tpl
