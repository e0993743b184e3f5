"""Interactive multi-turn chat with a run: tokens are printed as they are generated.

Commands inside the chat: /base and /tuned switch the adapter off and on (the conversation is
kept, so the other model answers the same history), /reset starts a new conversation, /help lists
the commands, /exit (or Ctrl-D) leaves. Ctrl-C while an answer is streaming stops that answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinysft.data.formats import Message
from tinysft.generation import Sampling, adapter_state, encode_prompt, stream_text

HELP = "/base  answer with the adapter off · /tuned  adapter on · /reset  new conversation · /exit  leave"


@dataclass
class ChatSession:
    """One conversation with a model; ``tuned`` selects adapter on (tuned) or off (base)."""

    model: Any
    tokenizer: Any
    tuned: bool = True
    system_prompt: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    history: list[Message] = field(default_factory=list)

    @property
    def side(self) -> str:
        return "tuned" if self.tuned else "base"

    def context_limit(self) -> int:
        """Prompt tokens that still leave room for a full answer in the model's context window."""
        window = getattr(getattr(self.model, "config", None), "max_position_embeddings", None) or 2048
        return max(64, int(window) - self.max_new_tokens)

    def _fit(self, messages: list[Message]) -> tuple[list[Message], int]:
        """Drop the oldest exchanges until the prompt fits the context; returns (messages, dropped turns)."""
        dropped = 0
        while len(messages) > 1 and len(encode_prompt(self.tokenizer, messages, self.system_prompt)) > self.context_limit():
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            dropped += 1
        return messages, dropped

    def reply(self, text: str, on_text: Callable[[str], None] = lambda _t: None) -> str:
        """Answer a user turn (streamed to ``on_text``); both turns join the history."""
        messages, dropped = self._fit([*self.history, {"role": "user", "content": text}])
        if dropped:
            self.history = messages[:-1]
        with adapter_state(self.model, self.tuned):
            sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, seed=None)
            answer = stream_text(self.model, self.tokenizer, messages, sampling, on_text=on_text,
                                 system_prompt=self.system_prompt)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []


def command(session: ChatSession, line: str) -> str | None:
    """Run a /command; returns the message to show, or None for /exit. Unknown commands are explained."""
    cmd = line.strip().split()[0].lower()
    if cmd in ("/exit", "/quit"):
        return None
    if cmd == "/reset":
        session.reset()
        return f"(new conversation, {session.side})"
    if cmd in ("/base", "/tuned"):
        session.tuned = cmd == "/tuned"
        kept = f"; {len(session.history) // 2} earlier exchange(s) kept, /reset to start over" if session.history else ""
        return f"(switched to {session.side}: adapter {'on' if session.tuned else 'off'}{kept})"
    if cmd == "/help":
        return HELP
    return f"(unknown command {cmd}; {HELP})"


def repl(session: ChatSession, *, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None,
         banner: str = "") -> None:
    """Read a line, answer it (streamed), repeat until /exit or end of input."""
    import sys

    def out(text: str) -> None:
        if write is not None:
            write(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(), where available)
    if banner:
        out(banner + "\n")
    out(HELP + "\n\n")
    while True:
        try:
            line = read(f"you ({session.side})> ")
        except EOFError:
            out("\n")
            return
        except KeyboardInterrupt:
            out("\n(Ctrl-D or /exit to leave)\n")
            continue
        if not line.strip():
            continue
        if line.strip().startswith("/"):
            message = command(session, line)
            if message is None:
                return
            out(message + "\n")
            continue
        out(f"{session.side}> ")
        try:
            session.reply(line, on_text=out)
        except KeyboardInterrupt:
            out(" [stopped]")  # the unfinished turn is not kept in the history
        out("\n\n")
