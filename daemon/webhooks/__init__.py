"""Webhooks: job ends POSTed to the configured receivers from the store's outbox
(`[webhooks.NAME]`; README "Webhooks"). Light to import: config.py uses `urls`."""
