"""The string literal under an assignment: how voxloop documents config fields, constants and metrics.

    class TrainerConfig:
        min_feedback: int = 64
        \"\"\"A cycle starts as soon as this many feedback items are pending...\"\"\"

`attribute_docs(TrainerConfig)` -> {"min_feedback": "A cycle starts as soon as ..."}. The CLI's flag
help (trainer/config_flags.py) and docs/operations.md's reference tables (scripts/gen_operations_docs.py)
both read the docs this way, so a field is documented once, where it is defined.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import ModuleType


def attribute_docs(owner: type | ModuleType) -> dict[str, str]:
    """Name -> the string right under its assignment in `owner`'s body (a class or a module), whitespace joined."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(owner)))
    body = tree.body
    if isinstance(owner, type):
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner.__name__).body
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


__all__ = ["attribute_docs"]
