"""The HTTP service: app factory, settings, errors, AUTOMATIC1111 translation, previews, one router per family.

    from orchestrator.server.app import create_app
    from orchestrator.server.settings import Settings
"""
