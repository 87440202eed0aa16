"""The one part of promptq that speaks Celery: the app both processes build
(celery_app) and what goes on the broker (publish). The API publishes through it, the
worker consumes and publishes through it, and the domain below knows nothing of it."""
