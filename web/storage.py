"""How static files are stored and named: compressed, and named by their content.

`manage.py collectstatic` (run by `make run`, and by the browser tests before
their servers start) writes each file under a name that holds a hash of its
content (app.3f2a….js), a .gz beside it, and staticfiles.json, the map from
plain to hashed names. `{% static %}` then writes the hashed names into the
page, and WhiteNoise serves them gzipped with a ten-year max-age ("immutable"):
a new release has new names, so a browser never runs an old script with a new
page. The page itself is sent with no-cache (web/views.py).

The client is ES modules that import each other ("./api.js"); Django rewrites
those imports to the hashed names too (support_js_module_import_aggregation).
"""

import logging

from whitenoise.storage import CompressedManifestStaticFilesStorage

logger = logging.getLogger(__name__)


class HashedCompressedStaticFiles(CompressedManifestStaticFilesStorage):
    support_js_module_import_aggregation = True

    def stored_name(self, name):
        """The hashed name; the plain one (still served, by the finders) before collectstatic has run,
        so that `manage.py serve` on a fresh checkout shows a working page rather than an error."""
        try:
            return super().stored_name(name)
        except ValueError:
            logger.warning("static file %s is not in the staticfiles manifest: run manage.py collectstatic"
                           " (served under its plain name, without long caching)", name)
            return name
