"""The qwen-vl-serving policy pack (pulumi-policy): `pulumi preview --policy-pack policy`."""
