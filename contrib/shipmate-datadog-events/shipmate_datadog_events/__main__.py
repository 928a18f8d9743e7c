"""``python -m shipmate_datadog_events send TITLE``: the command without the agent's CLI."""

from shipmate_datadog_events import commands

commands()
