"""griffe extension for deltakit's API reference: what static analysis of the source cannot see.

* **Keyword constructors.** A method class (``LoraModel``) has no ``__init__`` in its source: ``DeltaBase`` makes an
  OpenDelta-style one from the config dataclass when the class is created (``LoraModel(model, lora_r=8, ...)``),
  with its signature and the hyper-parameters' docs. Reading the source would show the base class's
  ``(backbone_model, config, *, name)`` instead, so for those classes this imports the class and copies the real
  signature and the generated constructor docstring (its ``Args:``). Only the modules of such classes are
  imported: importing every module would run scripts such as ``deltakit.demo.__main__``.
* **Made methods.** Likewise a method assigned from a factory call (``from_pretrained = _one_call_loader(...)``)
  is data to static analysis; the live function's signature and docstring are used.
* **Sphinx roles.** Docstrings written for ``help()`` and IDEs use ``:class:`~deltakit.x.Y``` now and then; Markdown
  would show the role's name verbatim, so each becomes a code span of the name it points at.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")


def _short(target: str, tilde: bool) -> str:
    return target.rsplit(".", 1)[-1] if tilde else target


def _plain_roles(text: str) -> str:
    return ROLE.sub(lambda m: f"``{_short(m.group(1), m.group(0).split('`')[1].startswith('~'))}``", text)


def _annotation(value: Any) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    return value if isinstance(value, str) else inspect.formatannotation(value)


KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _function(name: str, live: Any) -> griffe.Function:
    """A griffe function with the live object's signature and docstring (Sphinx roles made plain)."""
    signature = inspect.signature(live)
    parameters = [
        griffe.Parameter(
            p.name,
            annotation=_annotation(p.annotation),
            kind=KINDS[p.kind],
            default=None if p.default is inspect.Parameter.empty else repr(p.default),
        )
        for p in signature.parameters.values()
    ]
    returns = _annotation(signature.return_annotation)
    function = griffe.Function(name, parameters=griffe.Parameters(*parameters), returns=returns)
    function.docstring = griffe.Docstring(
        _plain_roles(inspect.cleandoc(live.__doc__ or "")), parent=function, parser="google",
        parser_options={"ignore_init_summary": True},
    )
    return function


def _made_by_call(member: Any) -> bool:
    """``from_pretrained = _one_call_loader(...)``: a class attribute whose value a function call returns."""
    return isinstance(member, griffe.Attribute) and isinstance(member.value, griffe.ExprCall)


class DeltakitDocstrings(griffe.Extension):
    """Real constructors of the delta method classes; Sphinx roles as code spans."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if not cls.path.startswith("deltakit."):
            return
        generated_init = "config_class" in cls.members and "__init__" not in cls.members
        made = [name for name, member in cls.members.items() if _made_by_call(member)]
        if not generated_init and not made:
            return
        live = getattr(importlib.import_module(cls.module.path), cls.name)
        if generated_init and "__init__" in live.__dict__:  # not inherited: DeltaBase made it for this class
            # the source's class docstring stays; the generated __init__ docstring brings the parameters' docs
            cls.set_member("__init__", _function("__init__", live.__init__))
        for name in made:
            value = live.__dict__.get(name)
            function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if inspect.isfunction(function):  # a made method (AutoDeltaModel.from_pretrained), not data
                cls.set_member(name, _function(name, function))

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _plain_roles(obj.docstring.value)
