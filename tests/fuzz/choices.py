"""How the grammar makes its choices: one protocol, drawn by hypothesis in CI and by a seeded random
generator in the long mode, with features forced or excluded for targeted runs.

Every choice has a name and a tuple of options (simplest first, so hypothesis shrinks toward it).
The chooser keeps the trail of what it chose: a program's features, for grouping misses.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

Pick = Callable[[str, Sequence[Any]], Any]


class Unsatisfiable(Exception):
    """The forced, excluded and required options leave nothing to choose (the caller redraws)."""


class Chooser:
    """Chooses one option per named dimension. `exclude` and `only` narrow every choice of a name for
    the whole program; `require()` narrows choices for the extent of a block (a near-miss that needs
    a softcap, ...)."""

    def __init__(self, pick: Pick, exclude: Mapping[str, Sequence[Any]] | None = None,
                 only: Mapping[str, Sequence[Any]] | None = None) -> None:
        self._pick = pick
        self.exclude = dict(exclude or {})
        self.trail: list[tuple[str, Any]] = []
        self._required: list[Mapping[str, Sequence[Any]]] = [only] if only else []

    def __call__(self, name: str, options: Sequence[Any]) -> Any:
        allowed = [o for o in dict.fromkeys(options) if o not in self.exclude.get(name, ())
                   and all(o in r[name] for r in self._required if name in r)]
        if not allowed:
            raise Unsatisfiable(f"no option left for {name!r} among {list(options)}")
        drawn = [o for o in options if o in allowed]  # duplicates weight an option
        value = drawn[0] if len(allowed) == 1 else self._pick(name, drawn)
        self.trail.append((name, value))
        return value

    @contextlib.contextmanager
    def require(self, requirements: Mapping[str, Sequence[Any]]) -> Iterator[None]:
        self._required.append(requirements)
        try:
            yield
        finally:
            self._required.pop()


def random_chooser(seed: str, **narrowing: Any) -> Chooser:
    """Choices from `random.Random(seed)`: the same seed string always draws the same program."""
    rng = random.Random(seed)
    return Chooser(lambda _name, options: rng.choice(list(options)), **narrowing)


def hypothesis_chooser(data: Any, **narrowing: Any) -> Chooser:
    """Choices drawn from hypothesis's `st.data()`, so failures shrink toward the first options."""
    from hypothesis import strategies as st

    return Chooser(lambda name, options: data.draw(st.sampled_from(list(options)), label=name), **narrowing)
