"""The operator's console: events and alerts, signed host commands, the pool view."""
