"""Sphinx extension of the badexpert documentation: pages generated from the code.

- ``badexpert-cli``: the command line reference, walked from ``badexpert.cli.build_parser()``
  (every command, its usage, description and options, with the help texts the parser prints);
- ``badexpert-catalogue attacks|detectors``: one section per registered attack or detector, from
  the registry and the class (summary, reference defaults as ``badexpert list`` prints them, and
  for a detector its cost and capabilities);
- a docstring hook that reads this project's docstring style (``Parameters`` sections of
  ``name: text`` lines, other ``Title`` / ``-----`` sections) as reStructuredText.

Nothing here reads a file outside the repository or the network.
"""

from __future__ import annotations

import argparse
import inspect
import re

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# --- docstrings ------------------------------------------------------------------------------------
#: sections whose ``name: text`` lines become a field list of parameters
_FIELD_SECTIONS = {"Parameters": "param", "Other Parameters": "param", "Attributes": "ivar"}
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s*:\s+(.*)$")
_UNDERLINE = re.compile(r"^\s*(-{3,}|={3,})\s*$")


def rst_docstring(lines: list[str]) -> list[str]:
    """This project's docstring sections as reStructuredText: ``Title`` over a line of dashes is a
    rubric; in a ``Parameters`` section each ``name: text`` line (its continuation lines indented)
    is a ``:param name: text`` field. A section ends at the next title, or at a blank line followed
    by a line that is not an entry."""
    out: list[str] = []
    field: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        title = line.strip()
        if title and i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].strip()) >= len(title) - 1:
            indent = line[: len(line) - len(line.lstrip())]
            field = _FIELD_SECTIONS.get(title)
            if out and out[-1].strip():
                out.append("")
            if field is None:  # a field list carries its own title ("Parameters:")
                out += [f"{indent}.. rubric:: {title}", ""]
            i += 2
            continue
        if field is not None:
            m = _ENTRY.match(line)
            if m:
                if out and out[-1].strip() and not out[-1].startswith((" ", ":")):
                    out.append("")
                out.append(f":{field} {m.group(1)}: {m.group(2)}")
            elif not line.strip():
                out.append(line)
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                if nxt and not nxt.startswith(" ") and not _ENTRY.match(nxt):
                    field = None
            elif line.startswith(" "):
                out.append(line)
            else:  # an unindented line that is not an entry: the list is over
                field = None
                out += ["", line]
        else:
            out.append(line)
        i += 1
    return out


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = rst_docstring(lines)


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    """A class whose base defines ``__new__(cls, *args, **kwargs)`` (the detectors' abstract-method
    check) shows its constructor's parameters and defaults instead (the types are in the docstring)."""
    if what != "class" or signature != "(*args, **kwargs)" or "__init__" not in vars(obj):
        return None
    sig = inspect.signature(obj.__init__)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in list(sig.parameters.values())[1:]]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty)), None


# --- inline text -----------------------------------------------------------------------------------
def _inline(text: str) -> list[nodes.Node]:
    """Plain help text with its ```code``` spans as literals (never parsed as markup)."""
    parts = re.split(r"`([^`]+)`", text)
    return [nodes.literal(p, p) if k % 2 else nodes.Text(p) for k, p in enumerate(parts) if p]


def _para(text: str) -> nodes.paragraph:
    p = nodes.paragraph()
    p += _inline(text)
    return p


def _section(directive: SphinxDirective, ident: str, title: str, literal_title: bool = True) -> nodes.section:
    sec = nodes.section(ids=[nodes.make_id(ident)], names=[nodes.fully_normalize_name(ident)])
    t = nodes.title()
    t += nodes.literal(title, title) if literal_title else nodes.Text(title)
    sec += t
    directive.state.document.note_implicit_target(sec, sec)
    return sec


# --- command line ----------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser):
    """``(name, help, subparser)`` for each command, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


def _complete(parser: argparse.ArgumentParser) -> None:
    """Let a parser add the options it defers (``Parser.defer``): they appear when it formats help."""
    parser.format_help()


def _options(directive, parser: argparse.ArgumentParser) -> list[nodes.Node]:
    formatter = parser._get_formatter()
    out: list[nodes.Node] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]
        if not actions:
            continue
        out.append(nodes.rubric(text=group.title or "options"))
        if group.description:
            out.append(_para(group.description))
        dl = nodes.definition_list()
        for action in actions:
            invocation = formatter._format_action_invocation(action)
            item = nodes.definition_list_item()
            term = nodes.term()
            term += nodes.literal(invocation, invocation)
            item += term
            body = nodes.definition()
            help_text = formatter._expand_help(action) if action.help else ""
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction) and "{" not in invocation:
                help_text += f" (choices: {', '.join(map(str, action.choices))})"
            if action.required and action.option_strings:
                help_text = "required; " + help_text if help_text else "required"
            body += _para(help_text.strip() or "(no help text)")
            item += body
            dl += item
        out.append(dl)
    return out


class CliDirective(SphinxDirective):
    """``.. badexpert-cli::`` — the reference of every command, from ``build_parser()``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from badexpert.cli import build_parser

        parser = build_parser()
        _complete(parser)
        out: list[nodes.Node] = [nodes.literal_block(text=parser.format_usage().strip())]
        if parser.description:
            out.append(_para(parser.description))
        for name, help_text, sub in _subcommands(parser):
            _complete(sub)
            sec = _section(self, f"cli-{name}", f"badexpert {name}")
            if help_text:
                sec += _para(help_text[0].upper() + help_text[1:] + ".")
            sec += nodes.literal_block(text=sub.format_usage().strip())
            if sub.description and sub.description != help_text:
                sec += _para(sub.description.replace("%%", "%"))
            sec += _options(self, sub)
            out.append(sec)
        return out


# --- catalogues ------------------------------------------------------------------------------------
def _first_paragraph(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].strip()


def _detector_facts(cls) -> list[tuple[str, str]]:
    det = cls()
    cost = det.cost
    passes = f"{cost['forward']} forward" + (f" + {cost['backward']} backward" if cost.get("backward") else "")
    facts = [("model passes per input", passes if det.uses_model else "none: never runs the suspect model")]
    if det.uses_model and getattr(cls, "shares_model_pass", False):
        facts.append(("in a guard", "reuses the model's own forward pass"))
    facts.append(("ONNX export", "yes" if cls.exportable else "no (its score needs more than the model's logits and its own networks)"))
    if cls.cli_options:
        facts.append(("own command-line options", ", ".join(o.flag for o in cls.cli_options)))
    return facts


def _attack_facts(cls) -> list[tuple[str, str]]:
    facts = [("labels", "clean-label: poisons target-class samples and keeps their labels" if cls.clean_label
              else "the poisoned samples are relabelled to the target, or the backdoor needs no poisoned data")]
    facts.append(("trigger extent", "local (a region of the image)" if cls.trigger_extent == "local"
                  else f"{cls.trigger_extent} (the whole image)"))
    if cls.all_to_all:
        facts.append(("targets", "all-to-all: class y becomes (y + 1) mod C"))
    if cls.learned:
        facts.append(("trigger", "learned: trained inside the attack (``implant``) before it can be applied"))
    return facts


class CatalogueDirective(SphinxDirective):
    """``.. badexpert-catalogue:: attacks`` (or ``detectors``) — one section per registry entry."""

    required_arguments = 1
    option_spec = {"facts": directives.flag}

    def run(self) -> list[nodes.Node]:
        from badexpert.cli import _parameters

        kind = self.arguments[0]
        if kind == "attacks":
            from badexpert.attacks import ATTACKS as registry

            facts = _attack_facts
        elif kind == "detectors":
            from badexpert.detectors import DETECTORS as registry

            facts = _detector_facts
        else:
            raise self.error(f"badexpert-catalogue: unknown kind {kind!r} (attacks or detectors)")
        out: list[nodes.Node] = []
        for name, cls in registry.items():
            sec = _section(self, f"{kind}-{name}", name)
            lines = [_first_paragraph(cls), "",
                     f"Class: :class:`{cls.__module__}.{cls.__qualname__}` (its docstring has every parameter and "
                     "where the implementation departs from its paper).", ""]
            lines += [".. list-table::", "   :widths: 30 70", ""]
            for key, value in facts(cls):
                lines += [f"   * - {key}", f"     - {value}"]
            params = _parameters(cls)
            if params:
                lines += ["", ".. rubric:: Parameters and their reference defaults", ""]
                lines += [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "",
                          "   * - parameter", "     - default"]
                for key, default in params:
                    lines += [f"   * - ``{key}``", f"     - ``{default!r}``"]
            body = nodes.container()
            nested_parse_with_titles(self.state, StringList(lines, source=f"<{kind} catalogue: {name}>"), body)
            sec += body.children
            out.append(sec)
        return out


# --- API reference --------------------------------------------------------------------------------
class ModulesDirective(SphinxDirective):
    """``.. badexpert-modules:: badexpert.attacks`` — the package and every module under it (found on
    disk, so a new module is documented without editing a page), one section each, documented by
    autodoc (members defined in the module; re-exports are documented where they are defined)."""

    required_arguments = 1
    option_spec = {"exclude": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        import importlib
        import pkgutil

        name = self.arguments[0]
        exclude = set((self.options.get("exclude") or "").split())
        module = importlib.import_module(name)
        names = [name]
        if hasattr(module, "__path__"):
            names += sorted(m.name for m in pkgutil.iter_modules(module.__path__, prefix=name + ".")
                            if m.name.rsplit(".", 1)[1] not in exclude and not m.name.rsplit(".", 1)[1].startswith("_"))
        lines: list[str] = []
        for mod in names:
            lines += [f"``{mod}``", "-" * (len(mod) + 4), "", f".. automodule:: {mod}", ""]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=f"<modules of {name}>"), container)
        return container.children


class ExportsDirective(SphinxDirective):
    """``.. badexpert-exports::`` — the names ``import badexpert`` gives, each with the first line of
    its docstring and a link to where it is documented."""

    def run(self) -> list[nodes.Node]:
        import badexpert

        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 25 75", "", "   * - name", "     - what it is"]
        for name in badexpert.__all__:
            obj = getattr(badexpert, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                role = "class" if inspect.isclass(obj) else "func"
                ref = f":{role}:`{name} <{obj.__module__}.{obj.__qualname__}>`"
                summary = _first_paragraph(obj).split(". ")[0].rstrip(".")
            else:  # a registry: documented with the module that defines it
                module = badexpert._EXPORTS[name]
                ref = f":mod:`{name} <badexpert.{module}>`"
                summary = f"the {getattr(obj, 'kind', name.lower())} registry: name -> factory"
            lines += [f"   * - {ref}", f"     - {' '.join(summary.split())}"]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="<badexpert exports>"), container)
        return container.children


# --- short public names ----------------------------------------------------------------------------
def _public_aliases() -> dict[str, str]:
    """``badexpert.Guard`` -> ``badexpert.deploy.guard.Guard``: every name a package re-exports
    (its ``__all__``, or ``badexpert``'s lazy exports), mapped to where it is documented."""
    import importlib
    import pkgutil

    import badexpert

    packages = ["badexpert"] + [f"badexpert.{m.name}" for m in pkgutil.iter_modules(badexpert.__path__) if m.ispkg]
    out: dict[str, str] = {}
    for pkg in packages:
        module = importlib.import_module(pkg)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                real = f"{obj.__module__}.{obj.__qualname__}"
                if real != f"{pkg}.{name}":
                    out[f"{pkg}.{name}"] = real
    return out


def _add_aliases(app, env) -> None:
    """Let the short public names resolve: ``{class}`badexpert.Guard``` links to the class's page."""
    objects = env.get_domain("py").objects
    for alias, real in _public_aliases().items():
        if real in objects and alias not in objects:
            objects[alias] = objects[real]


def setup(app):
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    app.connect("autodoc-process-signature", _class_signature)
    app.connect("env-updated", _add_aliases)
    app.add_directive("badexpert-cli", CliDirective)
    app.add_directive("badexpert-catalogue", CatalogueDirective)
    app.add_directive("badexpert-modules", ModulesDirective)
    app.add_directive("badexpert-exports", ExportsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
