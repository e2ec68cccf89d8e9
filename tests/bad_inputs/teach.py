"""One convention for the bad-input suite: an error must teach.

Every case is a row ``Case(id, call, exc, needles)``: calling ``call()`` must raise ``exc`` (or a
subclass) and the message must contain every needle, case-insensitively: the offending value and
what was expected. A row whose call raises anything else, or nothing, fails; so does a message
that lost a needle. Tables live beside this file, one per area (core, torch, peft, checkpoint,
command).

Where the input is suspicious rather than wrong (the call goes through), ``exc`` is a ``Warning``
class: the call must then emit a warning of that class whose message holds every needle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], Any]
    exc: type[BaseException] | tuple[type[BaseException], ...]
    needles: tuple[str, ...] = field(default=())


def assert_teaches(case: Case) -> None:
    if isinstance(case.exc, type) and issubclass(case.exc, Warning):
        with pytest.warns(case.exc) as record:
            case.call()
        messages = [str(w.message) for w in record if issubclass(w.category, case.exc)]
        assert any(all(n.lower() in m.lower() for n in case.needles) for m in messages), (
            f"{case.id}: no {case.exc.__name__} names all of {list(case.needles)}; got {messages}"
        )
        return
    with pytest.raises(case.exc) as info:
        case.call()
    message = str(info.value).lower()
    missing = [n for n in case.needles if n.lower() not in message]
    assert not missing, f"{case.id}: message {str(info.value)!r} does not name {missing}"


def params(cases: list[Case]):
    """``pytest.mark.parametrize`` arguments with readable ids; duplicate ids are a table bug."""
    ids = [c.id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"duplicate case ids: {sorted(dupes)}"
    return pytest.mark.parametrize("case", cases, ids=ids)
