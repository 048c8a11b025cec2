"""The rules in `rules.py` as pulumi-policy stack validations.

Stack validations (not per-resource ones) because a rule needs a resource's dependencies: the launch
template an instance is launched from, the placement group that template names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyConfigSchema,
    PolicyResource,
    ReportViolation,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import UnknownValueError

from infra.policy.rules import DEFAULTS, RULES, RuleSpec, Subject

NAME = "gpu-fleet-guardrails"
# dependencies followed from a resource: instance -> launch template -> placement group
DEPTH = 2

CONFIG_SCHEMA = PolicyConfigSchema(properties={
    key: {"type": "array", "items": {"type": "string"}, "default": value} for key, value in DEFAULTS.items()
})


def subject(resource: PolicyResource, depth: int = DEPTH) -> Subject:
    """A Subject from a policy resource, with its dependencies up to `depth` levels (each once)."""
    related: dict[str, Subject] = {}
    frontier = list(resource.dependencies)
    for _ in range(depth):
        following: list[PolicyResource] = []
        for dep in frontier:
            if dep.urn not in related and dep.urn != resource.urn:
                related[dep.urn] = Subject(dep.resource_type, dep.name, dep.props)
                following += dep.dependencies
        frontier = following
    return Subject(resource.resource_type, resource.name, resource.props, tuple(related.values()))


def _validate(rule: RuleSpec):
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        config: Mapping[str, Any] = {**DEFAULTS, **args.get_config()}
        for resource in args.resources:
            try:
                messages = rule.check(subject(resource), config)
            except UnknownValueError as exc:  # one resource's unknown must not skip the rule for the others
                messages = [f"{resource.name}: cannot be checked at preview: {exc.message}"]
            for message in messages:
                report_violation(message, resource.urn)

    return validate


def policies() -> list[Policy]:
    """One stack validation per rule; mandatory rules block `pulumi up`, advisory ones warn."""
    return [
        StackValidationPolicy(
            name=rule.name,
            description=rule.description,
            validate=_validate(rule),
            enforcement_level=EnforcementLevel.MANDATORY if rule.mandatory else EnforcementLevel.ADVISORY,
            config_schema=CONFIG_SCHEMA,
        )
        for rule in RULES
    ]
