import pytest

from tinysft.data.batching import IGNORE, collate, make_batches
from tinysft.data.formats import to_conversation
from tinysft.data.render import RenderError, render


def _trained_text(r, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(r.input_ids, r.loss_mask, strict=True) if m])


def test_mask_covers_exactly_the_assistant_answer_and_end_of_turn(tokenizer) -> None:
    conv = to_conversation({"prompt": "What is 2+2?", "response": "Certainly! It is 4."})
    r = render(conv, tokenizer)
    assert _trained_text(r, tokenizer) == "Certainly! It is 4." + tokenizer.eos_token
    # Everything before the answer is context: the template's system/user/headers are untrained.
    first = r.loss_mask.index(1)
    assert tokenizer.decode(r.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert r.loss_mask[-1] == 0 or r.input_ids[-1] == tokenizer.eos_token_id


def test_prompt_tokens_equal_inference_tokens(tokenizer) -> None:
    """The untrained prefix is token-for-token what generation sees (no boundary merges)."""
    from tinysft.data.render import render_prompt

    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    r = render(msgs, tokenizer)
    prompt_ids = render_prompt(msgs[:1], tokenizer)
    assert r.input_ids[: len(prompt_ids)] == prompt_ids
    assert r.loss_mask[: len(prompt_ids)] == [0] * len(prompt_ids)
    assert r.loss_mask[len(prompt_ids)] == 1


def test_multi_turn_trains_every_assistant_turn_only(tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Blue."}]
    r = render(msgs, tokenizer)
    eos = tokenizer.eos_token
    assert _trained_text(r, tokenizer) == f"Hello!{eos}Blue.{eos}"
    assert "Be brief" not in _trained_text(r, tokenizer)


def test_system_prompt_option_is_prepended(tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.decode(render(msgs, tokenizer, system_prompt="You are polite.").input_ids)
    assert "You are polite." in text


def test_truncation_that_removes_every_answer_is_an_error(tokenizer) -> None:
    msgs = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RenderError, match="zero trained tokens"):
        render(msgs, tokenizer, max_length=20)
    r = render(msgs, tokenizer, max_length=10_000)
    assert not r.truncated and r.n_trained > 0


def test_template_that_rewrites_history_is_refused(tokenizer) -> None:
    class Rewriting:
        """A template that renders earlier assistant turns differently once more turns follow."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            parts = [f"{m['role']}:{m['content'] if i == len(messages) - 1 else m['content'].upper()}|"
                     for i, m in enumerate(messages)]
            return "".join(parts) + ("assistant:" if add_generation_prompt else "")

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(RenderError, match="not a prefix"):
        render(msgs, Rewriting())


def test_collate_labels_and_padding(tokenizer) -> None:
    rows = [render([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenizer)
            for q, a in [("Hi", "Hello there, friend!"), ("A much longer question about many things?", "Yes.")]]
    b = collate(rows, tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert (b.labels[i, n:] == IGNORE).all()
        trained = b.labels[i, :n] != IGNORE
        assert trained.tolist() == [bool(m) for m in r.loss_mask]
    assert b.n_trained == sum(r.n_trained for r in rows)


def test_batches_cover_every_row_once(tokenizer) -> None:
    rows = [render([{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": "a"}], tokenizer)
            for i in range(21)]
    for packing in (False, True):
        batches = make_batches(rows, 4, tokenizer.pad_token_id, packing=packing, seed=1)
        assert sum(b.n_trained for b in batches) == sum(r.n_trained for r in rows)
        assert sum(b.n_tokens for b in batches) == sum(len(r.input_ids) for r in rows)


# ---- pinned by mutation testing (docs/mutation.md): each test kills mutants that survived before ----
def test_errors_and_the_rendered_row_carry_the_rows_source(tokenizer) -> None:
    from tinysft.data.formats import Conversation
    from tinysft.data.render import render_problem

    conv = Conversation([{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}],
                        "data/train.jsonl:7", "messages")
    with pytest.raises(RenderError) as e:
        render(conv, tokenizer, max_length=8)
    assert str(e.value).startswith("data/train.jsonl:7: zero trained tokens")
    problem = render_problem(conv, "messages", e.value)
    assert (problem.file, problem.line, problem.field) == ("data/train.jsonl", 7, "messages")
    assert problem.what.startswith("zero trained tokens") and problem.fix == "see above"
    spaced = Conversation(conv.messages, "my data/t.jsonl:3", "messages")
    assert render_problem(spaced, "messages", RenderError("my data/t.jsonl:3: bad: worse")).what == "bad: worse"
    r = render(conv, tokenizer)
    assert r.source == "data/train.jsonl:7" and r.rejected is None and r.pair_tokens == 0 and r.pair_only is False
    assert render(conv.messages, tokenizer).source == ""  # a plain message list has no source
    with pytest.raises(RenderError, match=r"^: no assistant text"):
        render([{"role": "user", "content": "Hi"}], tokenizer)


def test_system_prompt_is_context_and_does_not_replace_the_rows_own(tokenizer) -> None:
    from tinysft.data.render import render_prompt

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    r = render(msgs, tokenizer, system_prompt="You are polite.")
    text = tokenizer.decode(r.input_ids)
    assert text.count("You are polite.") == 1 and text.index("You are polite.") < text.index("Hi")
    assert text.startswith("<|im_start|>system\nYou are polite.<|im_end|>")  # as the system turn, not another one
    assert _trained_text(r, tokenizer) == "Hello!" + tokenizer.eos_token
    prompt = render_prompt(msgs[:1], tokenizer, system_prompt="You are polite.")
    assert r.input_ids[: len(prompt)] == prompt and r.loss_mask[: len(prompt)] == [0] * len(prompt)
    assert render_prompt(msgs[:1], tokenizer) != prompt  # without it the prompt is another one
    own = [{"role": "system", "content": "Be terse."}, *msgs]
    for ids in (render(own, tokenizer, system_prompt="You are polite.").input_ids,
                render_prompt(own[:2], tokenizer, system_prompt="You are polite.")):
        text = tokenizer.decode(ids)
        assert "Be terse." in text and "You are polite." not in text


def test_truncation_keeps_exactly_max_length_tokens(tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "one two three four five six seven"}]
    full = render(msgs, tokenizer)
    n = len(full.input_ids)
    assert full.truncated is False and render(msgs, tokenizer, max_length=n).truncated is False
    cut = render(msgs, tokenizer, max_length=n - 3)
    assert cut.truncated is True and cut.input_ids == full.input_ids[: n - 3] and cut.loss_mask == full.loss_mask[: n - 3]


@pytest.mark.parametrize(("mask", "span"), [([0, 1, 1, 0, 1, 1], (4, 6)), ([1, 1, 0, 0], (0, 2)), ([0, 0], (0, 0)),
                                            ([0, 1], (1, 2)), ([1], (0, 1)), ([0, 1, 1, 1, 0], (1, 4))])
def test_last_answer_is_the_last_trained_run(mask: list[int], span: tuple[int, int]) -> None:
    from tinysft.data.render import Rendered

    assert Rendered(list(range(len(mask))), mask).last_answer() == span


def test_last_answer_of_a_rendered_conversation(tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue."}]
    r = render(msgs, tokenizer)
    start, end = r.last_answer()
    assert tokenizer.decode(r.input_ids[start:end]) == "Blue." + tokenizer.eos_token


def test_show_mask_marks_trained_tokens_green(tokenizer) -> None:
    from tinysft.data.render import show_mask

    r = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer)
    text = show_mask(r, tokenizer)
    assert text.plain == "".join(tokenizer.decode([t]) for t in r.input_ids)
    green = "".join(text.plain[s.start:s.end] for s in text.spans if str(s.style) == "bold black on green")
    dim = "".join(text.plain[s.start:s.end] for s in text.spans if str(s.style) == "dim")
    assert green == "Hello!" + tokenizer.eos_token and "Hi" in dim and len(green) + len(dim) == len(text.plain)


class CharTemplate:
    """A character-level stand-in for a tokenizer: "role:content|" per message, "assistant:" as the
    generation prompt; token ids are character codes, and special tokens (when asked for) a leading 1."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"{m['role']}:{m['content']}|" for m in messages) + ("assistant:" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_render_ids_are_the_template_text_without_special_tokens_or_a_generation_prompt(tokenizer) -> None:
    from tinysft.data.render import render_prompt

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    r = render(msgs, CharTemplate())
    assert "".join(map(chr, r.input_ids)) == "user:Hi|assistant:Yo|user:Q|assistant:A|"
    assert "".join(chr(t) for t, m in zip(r.input_ids, r.loss_mask, strict=True) if m) == "Yo|A|"
    assert "".join(map(chr, render_prompt(msgs[:1], CharTemplate()))) == "user:Hi|assistant:"
    real = render(msgs, tokenizer)  # the real template, decoded: exactly its text, nothing added
    assert tokenizer.decode(real.input_ids) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_the_refusal_of_a_rewriting_template_says_what_to_do() -> None:
    class Rewriting(CharTemplate):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return super().apply_chat_template([{**m, "content": m["content"].upper()} if i < len(messages) - 1 else m
                                                for i, m in enumerate(messages)], tokenize, add_generation_prompt)

    from tinysft.data.formats import Conversation

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(RenderError) as e:
        render(Conversation(msgs, "f.jsonl:2", "messages"), Rewriting())
    assert str(e.value) == (
        "f.jsonl:2: the chat template renders assistant turn 1 differently inside the whole conversation than on its "
        "own (the prompt is not a prefix of prompt+answer), so the trained tokens cannot be located safely. Split the "
        "conversation into single-turn rows, or use a model whose template renders turns independently.")


def test_rows_no_template_can_render_are_refused_with_the_fix() -> None:
    from tinysft.data.formats import Conversation

    def refusal(messages: list, source: str) -> str:
        with pytest.raises(RenderError) as e:
            render(Conversation(messages, source, "messages"), CharTemplate())
        return str(e.value)

    answer = {"role": "assistant", "content": "b"}
    assert refusal([], "f.jsonl:1") == "f.jsonl:1: the conversation is empty — add a user message and the assistant's answer."
    assert refusal([answer, {"role": "user", "content": "a"}, answer], "f.jsonl:2") == (
        "f.jsonl:2: the conversation starts with an assistant turn — start it with a user message.")
    assert refusal([{"role": "user", "content": "a\ud83d"}, answer], "f.jsonl:3") == (
        "f.jsonl:3: a message holds a lone UTF-16 surrogate (half of an escaped emoji) — write the character itself, "
        "or both halves of its escape.")


def test_render_all_renders_in_order_with_the_options_or_lists_every_refused_row() -> None:
    from tinysft.data.formats import Conversation
    from tinysft.data.render import render_all
    from tinysft.data.validate import DataError

    def conv(source: str, *contents: str) -> Conversation:
        roles = ("user", "assistant") if contents else ()
        return Conversation([{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)], source, "messages")

    good = [conv("f.jsonl:1", "Hi", "Hello"), conv("f.jsonl:3", "Q", "A long answer")]
    rows = render_all(good, CharTemplate(), 36, system_prompt="S")
    assert rows == [render(c, CharTemplate(), 36, "S") for c in good]
    assert "".join(map(chr, rows[0].input_ids)) == "system:S|user:Hi|assistant:Hello|"
    assert not rows[0].truncated and rows[1].truncated and len(rows[1].input_ids) == 36  # of 40
    first = Conversation([{"role": "assistant", "content": "b"}], "f.jsonl:2", "messages")
    with pytest.raises(DataError) as e:
        render_all([good[0], first, good[1], conv("f.jsonl:4")], CharTemplate(), 30)
    assert str(e.value).splitlines() == [
        "f.jsonl:2: messages: the conversation starts with an assistant turn — start it with a user message. — see above",
        "f.jsonl:4: messages: the conversation is empty — add a user message and the assistant's answer. — see above"]


def test_the_untrained_tail_after_the_last_answer_gets_no_special_tokens() -> None:
    class NewlineTemplate(CharTemplate):
        """Each message ends with a newline, as ChatML's "<|im_end|>\\n" does."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"{m['role']}:{m['content']}|\n" for m in messages) + ("assistant:" if add_generation_prompt else "")

    r = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], NewlineTemplate())
    assert "".join(map(chr, r.input_ids)) == "user:Hi|\nassistant:Yo|\n"
    assert "".join(chr(t) for t, m in zip(r.input_ids, r.loss_mask, strict=True) if m) == "Yo|"  # not the newline


def test_a_template_that_renders_the_last_answer_its_own_way_is_refused() -> None:
    class LastAnswerMarked(CharTemplate):
        """The last message, when it is an answer, gets a marker that the same answer lacks inside a longer
        conversation (as templates that drop earlier turns' reasoning do): prompt+answer is then not a prefix
        of the whole conversation, though the prompt is a prefix of both."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = super().apply_chat_template(messages, tokenize, add_generation_prompt)
            return text[:-1] + "*|" if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt else text

    from tinysft.data.formats import Conversation

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert "".join(map(chr, render(msgs[:2], LastAnswerMarked()).input_ids)) == "user:a|assistant:b*|"  # one turn: fine
    with pytest.raises(RenderError, match=r"^f\.jsonl:2: the chat template renders assistant turn 1 differently"):
        render(Conversation(msgs, "f.jsonl:2", "messages"), LastAnswerMarked())
