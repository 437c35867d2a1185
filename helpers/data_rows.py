"""Check one dataset row and turn it into a TRL conversational example: SFT `{"messages"}` from ShareGPT
(`from`/`value`) or OpenAI (`role`/`content`) turns, preference `{"prompt", "chosen", "rejected"}`; a row that
cannot be used raises an error whose message `reason_of` sorts into a short reason to count.

Two checks guard the chat format. A message holding the literal text of a Llama 3 special token (`<|eot_id|>`,
`<|start_header_id|>`, ...) drops its row: the tokenizer would turn that text into the control token itself.
Such rows are dropped, not escaped, so the text the model learns is never altered behind the user's back. An
empty system turn is removed and the row kept (counted as a change); other empty turns drop the row.
"""

from __future__ import annotations

from typing import Any

from helpers.chat import END_HEADER, END_OF_TEXT, EOM, EOT, START_HEADER, find_special_token

ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SPECIAL_TOKEN_TEXT = "literal special-token text"
EMPTY_SYSTEM_TURN = "empty system turn removed"


def to_messages(turns: Any, column: str, changes: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """Messages `{role, content}` from ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turns.

    An empty (or blank) system turn is left out, and `(EMPTY_SYSTEM_TURN, "'column' message i")` appended to
    `changes` when given.

    Raises:
        ValueError: the turns are not a non-empty list of known roles with non-empty text, or a text holds the
            literal text of a special token.
    """
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{column}' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"'{column}' message {i} is not an object with a role and a text")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise ValueError(f"'{column}' message {i} has unknown role {role!r} (known: {', '.join(ROLE_MAP)})")
        role = ROLE_MAP[role]
        if role == "system" and (content is None or (isinstance(content, str) and not content.strip())):
            if changes is not None:
                changes.append((EMPTY_SYSTEM_TURN, f"'{column}' message {i}"))
            continue
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"'{column}' message {i} ({role}) is empty")
        token = find_special_token(content)
        if token is not None:
            raise ValueError(
                f"'{column}' message {i} ({role}) contains the literal special token {token!r}: it would become a "
                f"control token ({special_token_effect(token, role)}); remove or escape it"
            )
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError(f"'{column}' is empty apart from empty system turns")
    return messages


def special_token_effect(token: str, role: str) -> str:
    """What a special token written inside a message would do to training, in words."""
    if role == "assistant" and token in (EOT, EOM, END_OF_TEXT):
        return "the model would learn to stop mid-answer"
    if token in (START_HEADER, END_HEADER, EOT, EOM):
        return "it would fake a turn boundary inside the message"
    return "the model would read a control token where the text has characters"


def check_conversation(messages: list[dict[str, str]], column: str) -> None:
    """Raise ValueError unless the conversation has a user turn and ends with an assistant turn."""
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"'{column}' does not end with an assistant turn (last role: {messages[-1]['role']})")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"'{column}' has no user turn")


def sft_example(record: dict, changes: list[tuple[str, str]] | None = None) -> dict:
    """A TRL conversational SFT example `{"messages": [...]}` from a FineTome-style row.

    Changes made to keep the row (an empty system turn removed) are appended to `changes` when given.
    """
    column = "conversations" if "conversations" in record else "messages"
    if column not in record:
        raise KeyError("missing column 'conversations' (ShareGPT from/value turns) or 'messages'")
    messages = to_messages(record[column], column, changes)
    check_conversation(messages, column)
    return {"messages": messages}


def preference_example(record: dict, changes: list[tuple[str, str]] | None = None) -> dict:
    """A TRL conversational preference example `{"prompt", "chosen", "rejected"}` (all message lists).

    orpo-dpo-mix-40k stores whole conversations in `chosen`/`rejected`; the shared turns before the final
    assistant turn become the prompt. Its string `prompt` column is not passed on: TRL decides whether a dataset
    is conversational from one arbitrary column, and a string beside message lists makes that a coin toss.
    Empty system turns leave `chosen` and `rejected` alike before the prompts are compared, and are appended to
    `changes` when given.
    """
    for column in ("chosen", "rejected"):
        if column not in record:
            raise KeyError(f"missing column '{column}'")
    chosen = to_messages(record["chosen"], "chosen", changes)
    rejected = to_messages(record["rejected"], "rejected", changes)
    if isinstance(record.get("prompt"), list):  # explicit-prompt format: prompt messages + one answer each
        prompt = to_messages(record["prompt"], "prompt", changes)
        chosen, rejected = prompt + chosen, prompt + rejected
    check_conversation(chosen, "chosen")
    check_conversation(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("'chosen' and 'rejected' do not share the same conversation before the last answer")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise ValueError("chosen is identical to rejected: the pair teaches nothing")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def reason_of(message: str) -> str:
    """A short reason to count drops under, from a row's problem message."""
    for key in (
        "unknown role",  # first: its message quotes the role it found, which could be any text
        "literal special token",
        "is empty",
        "identical",
        "does not end with an assistant",
        "no user turn",
        "do not share",
        "non-empty list",
        "not an object",
    ):
        if key in message:
            return {
                "literal special token": SPECIAL_TOKEN_TEXT,
                "non-empty list": "not a list of messages",
                "not an object": "malformed message",
                "does not end with an assistant": "does not end with an assistant turn",
            }.get(key, key)
    return "invalid row"
