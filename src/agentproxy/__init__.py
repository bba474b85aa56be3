"""agentproxy: a sidecar authorization proxy for AI agents."""
