"""qwen-vl-serving: load the stack's settings, build its components, export the outputs."""

import pulumi

from program.compose import compose
from stacks.parse import SettingsError
from stacks.rules import warnings
from stacks.settings import load_from_engine

try:
    settings = load_from_engine()
except SettingsError as err:
    # RunError ends the program with just this message: a config mistake is not a crash.
    raise pulumi.RunError(str(err)) from None

for warning in warnings(settings):
    pulumi.log.warn(str(warning))

for name, value in compose(settings).items():
    pulumi.export(name, value)
