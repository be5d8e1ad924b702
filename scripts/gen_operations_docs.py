"""Regenerate the reference sections of docs/operations.md from the code, so they cannot drift.

    .venv/bin/python scripts/gen_operations_docs.py           # rewrite the generated sections
    .venv/bin/python scripts/gen_operations_docs.py --check   # exit 1 if they are stale (tests/test_deploy.py)

Sections between `<!-- generated:NAME begin -->` and `<!-- generated:NAME end -->` are replaced:
- config: every ServerConfig field (server/config.py) with its environment variable, flag, default and
  the doc under the field; the same for the trainer's configs (trainer/config.py: TrainerConfig and its
  PPOConfig, CorpusConfig, PretrainConfig), their flags from trainer/cli.py's tables;
- metrics: every metric object of core/metrics.py: exposed name, type, labels, help, and the doc
  string under the definition (label values);
- alerts: every rule of deploy/prometheus/alerts.yml with its severity, `for` and runbook anchor.
Everything else in the file (the runbooks, the prose) is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import yaml
from voxloop.core.attribute_docs import attribute_docs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
_SECTION = re.compile(r"(<!-- generated:(\w+) begin -->\n)(.*?)(<!-- generated:\2 end -->)", re.S)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
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

    docs = attribute_docs(ServerConfig)
    flags = {field: flag for flag, field, _, _ in SERVE_FLAGS}
    rows = ["| setting (TOML key) | environment | `voxloop serve` flag | default | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(ServerConfig):
        flag = f"`{flags[f.name]}`" if f.name in flags else ""
        rows.append(f"| `{f.name}` | `{env_name(f.name)}` | {flag} | {_default(f.default)} | "
                    f"{_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows)


def _flags(table) -> dict[str, str]:
    """field -> its flag (and the flag's own default, where the field is required)."""
    return {flag.field: f"`{flag.flag}`" + (f" (default {_default(flag.default)})" if flag.default is not None else "")
            for flag in table}


def _dataclass_table(config_class, flags: dict[str, str], *, prefix: str = "", environment=None) -> str:
    """One row per field: name, [environment,] flag, default, the doc under the field."""
    docs = attribute_docs(config_class)
    header = ["field", *(["environment"] if environment else []), "flag", "default", "meaning"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in dataclasses.fields(config_class):
        name = prefix + f.name
        if f.default_factory is not dataclasses.MISSING:
            default = f"{f.default_factory.__name__}()"
            default = f"`{default}`" if not dataclasses.is_dataclass(f.default_factory) else f"below ({default})"
        else:
            default = _default(f.default)
        env = [environment(name)] if environment else []
        rows.append("| " + " | ".join([f"`{name}`", *env, flags.get(name, ""), default, _cell(docs.get(f.name, ""))])
                    + " |")
    return "\n".join(rows)


def trainer_config_tables() -> str:
    from voxloop.core.data_dir import HOME_ENV
    from voxloop.trainer import cli
    from voxloop.trainer.config import ENV_PREFIX, CorpusConfig, PPOConfig, PretrainConfig, TrainerConfig

    def environment(name: str) -> str:
        if name == "data_dir":
            return f"`{HOME_ENV}`"
        if name in ("store_url", "registry_dir", "ppo"):
            return "(the server's)" if name != "ppo" else ""
        if name.startswith("ppo."):
            return f"`{ENV_PREFIX}OBJECTIVE`" if name == "ppo.objective" else ""
        return f"`{ENV_PREFIX}{name.upper()}`"

    train_flags = _flags(cli.TRAIN_FLAGS)
    return ("### The online trainer (TrainerConfig)\n\n"
            "`voxloop train` flags map onto these fields (trainer/cli.py); the in-process trainer of `voxloop serve`\n"
            "takes them from `VOXLOOP_TRAINER_<FIELD>` (e.g. `VOXLOOP_TRAINER_MIN_FEEDBACK=16`,\n"
            "`VOXLOOP_TRAINER_OBJECTIVE=sft`); `VOXLOOP_TRAINER=off` turns it off. Flags win over variables.\n\n"
            + _dataclass_table(TrainerConfig, train_flags, environment=environment)
            + "\n\n#### Its update (TrainerConfig.ppo, PPOConfig)\n\n"
            + _dataclass_table(PPOConfig, train_flags, prefix="ppo.", environment=environment)
            + "\n\n### The synthetic corpus (`voxloop pretrain corpus`, CorpusConfig)\n\n"
            + _dataclass_table(CorpusConfig, _flags(cli.CORPUS_FLAGS))
            + "\n\n### Base-model pretraining (`voxloop pretrain train`, PretrainConfig)\n\n"
            + _dataclass_table(PretrainConfig, _flags(cli.PRETRAIN_FLAGS)))


def config_section() -> str:
    return "### `voxloop serve` (ServerConfig)\n\n" + server_config_table() + "\n\n" + trainer_config_tables()


def metrics_section() -> str:
    from prometheus_client.metrics import MetricWrapperBase
    from voxloop.core import metrics

    docs = attribute_docs(metrics)
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
