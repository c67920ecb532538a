"""Prompt templates: registry, chat-template rendering and plain fallback, user template files, stop strings."""

import pytest

from openrlhf_search.env.templates import PromptTemplate, available_templates, get_template, register_template
from openrlhf_search.rewards import extract_answer


def test_registry():
    assert {"search_r1", "qwen_tools"} <= set(available_templates())
    assert get_template("search_r1").stop == ("</search>", "</answer>")
    assert get_template("qwen_tools").stop == ("</tool_call>", "</answer>")
    with pytest.raises(KeyError, match="unknown prompt template 'nope'.*search_r1"):
        get_template("nope")
    with pytest.raises(KeyError, match="already registered"):
        register_template("search_r1")(lambda: None)
    assert get_template("search_r1", stop=("</answer>",)).stop == ("</answer>",)  # overrides replace fields


def test_render_with_chat_template_and_fallback(tok):
    tpl = get_template("search_r1")
    chat = tpl.render("Who is X?", tok)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\n")
    assert "Question: Who is X?" in chat
    plain = tpl.render("Who is X?", None)
    assert plain == tpl.user_message("Who is X?") + "\n"
    no_chat = get_template("search_r1", use_chat_template=False).render("Who is X?", tok)
    assert no_chat == plain
    tools = get_template("qwen_tools").render("Who is X?", tok)
    assert tools.startswith("<|im_start|>system\n") and '"name": "search"' in tools


def test_feedback_and_observation_wrapping():
    tpl = get_template("search_r1")
    assert tpl.wrap_observation("D") == "\n\n<information>D</information>\n\n"
    assert tpl.wrap_observation("D", hint=True).endswith(tpl.last_turn_hint + "</information>\n\n")
    assert tpl.last_turn_hint in tpl.feedback(hint=True) and tpl.last_turn_hint not in tpl.feedback()
    tools = get_template("qwen_tools")
    assert tools.wrap_observation("D", turn_ended=False).startswith("<|im_end|>\n<|im_start|>user\n<tool_response>")
    assert tools.wrap_observation("D", turn_ended=True).startswith("<|im_start|>user\n<tool_response>")
    for t in (tpl, tools):
        assert extract_answer(t.feedback(hint=True)) is None
    with pytest.raises(ValueError, match="hold the complete action '<answer>a</answer>'"):
        PromptTemplate(name="x", protocol="tags", user="{question}", invalid_feedback="use <answer>a</answer>")
    with pytest.raises(ValueError, match="hold the complete action '<search> and </search>'"):
        PromptTemplate(name="x", protocol="tags", user="Search between <search> and </search>. {question}")
    with pytest.raises(ValueError, match="protocol"):
        PromptTemplate(name="x", protocol="json", user="{question}")


def test_user_template_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("Use <search> when unsure. Keep {braces} as is.\nQ: {question}\n", encoding="utf-8")
    tpl = get_template(str(txt))
    assert tpl.protocol == "tags"
    assert tpl.user_message("Who?") == "Use <search> when unsure. Keep {braces} as is.\nQ: Who?\n"
    j = tmp_path / "p.jinja"
    j.write_text("Q: {{ question | upper }}", encoding="utf-8")
    assert get_template(str(j)).user_message("who?") == "Q: WHO?"
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt: prompt template has no '\{question\}' placeholder"):
        get_template(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        get_template(str(tmp_path / "missing.txt"))
