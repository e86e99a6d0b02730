"""Ray Serve application: deployments, HTTP API, configuration, metrics (thin wrappers over the core).

Entry points: ``serve_app.serve.app:build_app`` (the application builder named by
``deployments.yaml``) and the ``serve-app demo`` / ``serve-app serve`` commands
(:mod:`serve_app.serve.commands`). Importing this package does not import Ray.
"""
