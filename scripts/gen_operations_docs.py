"""Regenerate the reference sections of docs/operations.md from the code, so they cannot drift.

    .venv/bin/python scripts/gen_operations_docs.py           # rewrite the generated sections
    .venv/bin/python scripts/gen_operations_docs.py --check   # exit 1 if they are stale (tests/test_deploy.py)

Sections between `<!-- generated:NAME begin -->` and `<!-- generated:NAME end -->` are replaced:
- config: every ServerConfig field (server/config.py) with its environment variable, flag, default and
  the one-line doc under the field; the same for TrainerConfig (trainer/config.py) when present;
- metrics: every metric object of core/metrics.py: exposed name, type, labels, help, and the doc
  string under the definition (label values);
- alerts: every rule of deploy/prometheus/alerts.yml with its severity, `for` and runbook anchor.
Everything else in the file (the runbooks, the prose) is written by hand.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
_SECTION = re.compile(r"(<!-- generated:(\w+) begin -->\n)(.*?)(<!-- generated:\2 end -->)", re.S)


def attribute_docs(path: Path, class_name: str | None = None) -> dict[str, str]:
    """The string literal right under each assignment (of a class body, or of the module): name -> doc."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if class_name is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
        if (target and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[target] = " ".join(following.value.value.split())
    return docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(ROOT)}`"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def server_config_table() -> str:
    from voxloop.clients.cli import SERVE_FLAGS
    from voxloop.server.config import ServerConfig, env_name

    docs = attribute_docs(ROOT / "server" / "config.py", "ServerConfig")
    flags = {field: flag for flag, field, _, _ in SERVE_FLAGS}
    rows = ["| setting (TOML key) | environment | `voxloop serve` flag | default | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(ServerConfig):
        flag = f"`{flags[f.name]}`" if f.name in flags else ""
        rows.append(f"| `{f.name}` | `{env_name(f.name)}` | {flag} | {_default(f.default)} | "
                    f"{_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows)


def trainer_config_table() -> str:
    path = ROOT / "trainer" / "config.py"
    if not path.is_file():
        return "(the trainer is not installed)"
    docs = attribute_docs(path, "TrainerConfig")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainerConfig")
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            default = ast.unparse(node.value) if node.value is not None else ""
            rows.append(f"| `{node.target.id}` | `{_cell(default)}` | {_cell(docs.get(node.target.id, ''))} |")
    return "\n".join(rows)


def config_section() -> str:
    return ("### `voxloop serve` (ServerConfig)\n\n" + server_config_table()
            + "\n\n### The online trainer (TrainerConfig)\n\n"
            "`voxloop train` flags map onto these fields (trainer/cli.py); the in-process trainer of `voxloop serve`\n"
            "takes them from `VOXLOOP_TRAINER_<FIELD>` (e.g. `VOXLOOP_TRAINER_MIN_FEEDBACK=16`,\n"
            "`VOXLOOP_TRAINER_OBJECTIVE=sft`); `VOXLOOP_TRAINER=off` turns it off.\n\n"
            + trainer_config_table())


def metrics_section() -> str:
    from prometheus_client.metrics import MetricWrapperBase
    from voxloop.core import metrics

    docs = attribute_docs(ROOT / "core" / "metrics.py")
    suffix = {"counter": "_total", "info": "_info"}
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for attribute, metric in vars(metrics).items():
        if not isinstance(metric, MetricWrapperBase):
            continue
        family = metric.describe()[0]
        name = family.name + suffix.get(family.type, "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)  # no public accessor
        meaning = family.documentation
        if attribute in docs:
            meaning += f" ({docs[attribute]})"
        if family.type == "histogram":
            bounds = [b for b in metric._upper_bounds if b != float("inf")]
            meaning += f" Buckets: {', '.join(f'{b:g}' for b in bounds)}."
        rows.append(f"| `{name}` | {family.type} | {labels} | {_cell(meaning)} |")
    return "\n".join(rows)


def runbook_anchor(alert: str) -> str:
    return f"runbook-{alert.lower()}"


def alerts_section() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rows = ["| alert | severity | for | summary | runbook |", "|---|---|---|---|---|"]
    for group in groups:
        for rule in group["rules"]:
            summary = re.sub(r"\{\{.*?\}\}", "…", rule["annotations"]["summary"])
            rows.append(f"| `{rule['alert']}` | {rule['labels']['severity']} | {rule.get('for', '0s')} | "
                        f"{_cell(summary)} | [runbook](#{runbook_anchor(rule['alert'])}) |")
    return "\n".join(rows)


GENERATORS = {"config": config_section, "metrics": metrics_section, "alerts": alerts_section}


def render(text: str) -> str:
    """`text` with every generated section regenerated; raises ValueError for a missing or unknown section."""
    found = {m.group(2) for m in _SECTION.finditer(text)}
    if found != set(GENERATORS):
        raise ValueError(f"{DOC} must hold exactly the generated sections {sorted(GENERATORS)}; found {sorted(found)}")
    return _SECTION.sub(lambda m: f"{m.group(1)}{GENERATORS[m.group(2)]()}\n{m.group(4)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/operations.md is stale")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{DOC.relative_to(ROOT)} is stale: run .venv/bin/python scripts/gen_operations_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
