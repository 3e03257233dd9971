"""Rules: the user's per-tensor inits that override the model's own.

A key is a glob on a module's qualified name or a module type (the rule is for its ``weight``; its
``bias`` gets ``rule["bias"]``, zeros by default), or a glob on a parameter's qualified name or a
``(module type, parameter name)`` pair (the rule is for that parameter). Module keys are tried
first."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from initserve_client.torch_init.tensors import _Tensors

Rules = Mapping[Any, Mapping[str, Any]]


def _rule_inits(module: Any, tensors: _Tensors, rules: Rules | None) -> dict[str, dict[str, Any]]:
    """Canonical parameter name -> the spec fields of its rule."""
    if not rules:
        return {}
    ruled: dict[str, dict[str, Any]] = {}
    canonical = {id(t): n for n, t in tensors.params.items()}
    for module_name, child in module.named_modules():
        own = {k: p for k, p in child._parameters.items() if p is not None}
        prefix = f"{module_name}." if module_name else ""
        rule = _module_rule(module_name, child, rules) if "weight" in own else None
        for key, parameter in own.items():
            name = canonical[id(parameter)]
            if name in ruled:
                continue
            if rule is not None and key == "weight":
                ruled[name] = {k: v for k, v in rule.items() if k != "bias"}
            elif rule is not None and key == "bias":
                ruled[name] = dict(rule.get("bias") or {"scheme": "zeros"})
            else:
                chosen = _parameter_rule(prefix + key, child, key, rules)
                if chosen is not None:
                    ruled[name] = dict(chosen)
    return ruled


def _module_rule(name: str, module: Any, rules: Rules) -> Mapping[str, Any] | None:
    for key, rule in rules.items():
        if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
            return rule
    for key, rule in rules.items():
        if isinstance(key, type) and type(module) is key:
            return rule
    for key, rule in rules.items():
        if isinstance(key, type) and isinstance(module, key):
            return rule
    return None


def _parameter_rule(
    qualified: str, module: Any, key: str, rules: Rules
) -> Mapping[str, Any] | None:
    for pattern, rule in rules.items():
        if isinstance(pattern, str) and fnmatch.fnmatchcase(qualified, pattern):
            return rule
        if (
            isinstance(pattern, tuple)
            and len(pattern) == 2
            and isinstance(module, pattern[0])
            and fnmatch.fnmatchcase(key, pattern[1])
        ):
            return rule
    return None
