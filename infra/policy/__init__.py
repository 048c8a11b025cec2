"""The fleet's Pulumi policy pack: `pulumi preview --policy-pack infra/policy`."""
