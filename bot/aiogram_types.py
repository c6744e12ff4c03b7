"""Import aiogram with its Bot API types built leaves first: the same types, a second sooner.

Importing `aiogram.types` builds the pydantic schema of each of its ~440 models in turn
(`model_rebuild` in alphabetical order), most of a bot start. A model's schema takes in those
of the models its fields name; one built earlier is reused, one not yet built is generated
again inside it. Alphabetical order builds `AffiliateInfo` before `Chat` and `Message` (and the
hundred types they name), so they are generated over and over. Building each model's
dependencies first, fewest first, lets every schema reuse those below it: about a third less
CPU for importing aiogram (`bench/startup_bench.py`). The models, their fields and validation
are the same; tests/test_bot_client.py compares the JSON schemas of both ways. The order only
decides what can be reused: a model this reading of the annotations missed is generated inside
the others as before, never left out.

Only aiogram's own rebuild calls during that one import are taken over (those passing the
types namespace, for models of `aiogram.types`); pydantic's `model_rebuild` is put back
before this returns, whatever happens.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

_NAME = re.compile(r"[A-Za-z_]\w*")
Model = type[BaseModel]


def import_aiogram() -> None:
    """Import aiogram (if nothing has yet) with its types built in dependency order."""
    if "aiogram.types" in sys.modules:
        return
    with _rebuilds_in_dependency_order():
        import aiogram.types  # noqa: F401  # the import being sped up


@contextlib.contextmanager
def _rebuilds_in_dependency_order() -> Iterator[None]:
    original = BaseModel.__dict__["model_rebuild"]
    closures: dict[Model, set[Model]] = {}  # model -> the models it names, directly or not
    order: dict[Model, int] = {}  # model -> how many that is

    def rebuild(cls: type[BaseModel], **kwargs: Any) -> bool | None:
        namespace = kwargs.get("_types_namespace")
        if namespace is None or not cls.__module__.startswith("aiogram.types."):
            return original.__func__(cls, **kwargs)
        if not closures:
            closures.update(_closures(namespace))
            order.update({model: len(named) for model, named in closures.items()})
        for model in sorted(closures.get(cls, set()) | {cls}, key=lambda m: order.get(m, 0)):
            if not model.__pydantic_complete__:
                original.__func__(model, _types_namespace=namespace)
        return None

    # Replacing a method is what mypy flags; here it is the point, for this one import.
    BaseModel.model_rebuild = classmethod(rebuild)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        BaseModel.model_rebuild = original  # type: ignore[method-assign]  # put back


def _closures(namespace: dict[str, Any]) -> dict[Model, set[Model]]:
    """Every model of the namespace and the models its fields name, directly or not, read
    from the annotations (strings: aiogram's modules use `from __future__ import annotations`)."""
    models = {
        name: value
        for name, value in namespace.items()
        if isinstance(value, type) and issubclass(value, BaseModel)
    }
    named: dict[Model, set[Model]] = {}
    for model in models.values():
        texts = [
            text if isinstance(text, str) else repr(text)
            for klass in model.__mro__
            for text in getattr(klass, "__annotations__", {}).values()
        ]
        names = {word for text in texts for word in _NAME.findall(text)}
        named[model] = {models[name] for name in names if name in models} - {model}
    closures: dict[Model, set[Model]] = {}
    for model, direct in named.items():
        seen, stack = set(direct), list(direct)
        while stack:
            for more in named.get(stack.pop(), ()):
                if more not in seen:
                    seen.add(more)
                    stack.append(more)
        closures[model] = seen - {model}
    return closures
