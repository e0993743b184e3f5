"""Chat templates for models that ship none (``model.chat_template``): a built-in name or a Jinja file.

A base (non-instruct) model's tokenizer often has no chat template, so conversations cannot be
rendered. ``model.chat_template: chatml`` gives it one; the template's special markers are plain
text to such a tokenizer, which is fine: LoRA learns them like any other tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinysft.config import ConfigError

# ChatML (Qwen, SmolLM, many fine-tunes). The generation prompt opens the assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Zephyr / TinyLlama-chat style: <|user|> ... </s>, using the tokenizer's own end-of-sequence text.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Plain "User: / Assistant:" lines, for tokenizers without any special tokens to spare.
PLAIN = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "zephyr": ZEPHYR, "plain": PLAIN}

MISSING_TEMPLATE_FIX = (f"set model.chat_template to a built-in template ({', '.join(CHAT_TEMPLATES)}) or a Jinja "
                        "file, e.g. --set model.chat_template=chatml (data check: --chat-template chatml), or use "
                        "an instruct/chat model")


class TemplateError(ConfigError):
    """A ``model.chat_template`` that is neither a built-in name nor a readable file."""


def template_text(spec: str) -> str:
    """The Jinja text of a built-in name or a file path."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"model.chat_template: {path} could not be read ({e}).") from None
    raise TemplateError(f"model.chat_template: {spec!r} is neither a built-in template ({', '.join(CHAT_TEMPLATES)}) "
                        "nor an existing file — give one of those names or the path of a Jinja template.")


def apply_chat_template(tokenizer: Any, spec: str | None) -> Any:
    """Give ``tokenizer`` the template ``spec`` (replacing its own); None leaves it as it is."""
    if spec:
        tokenizer.chat_template = template_text(spec)
    return tokenizer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
