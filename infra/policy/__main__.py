"""Policy pack entry point (run by the Pulumi CLI): `pulumi preview --policy-pack infra/policy`."""

from pulumi_policy import PolicyPack

from infra.policy.pack import NAME, policies

PolicyPack(name=NAME, policies=policies())
