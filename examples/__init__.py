"""Plug-ins that live outside the `llm` package (README "Adding a router")."""
