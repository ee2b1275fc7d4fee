"""The Kubernetes DaemonSet agent: discovery, configuration, reconciliation."""
