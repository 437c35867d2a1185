"""Deployment-only tools (the Brev launchable); run from the repository root, never imported by `helpers`."""
