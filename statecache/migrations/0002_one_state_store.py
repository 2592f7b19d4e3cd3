"""The shared cache's spilled states become the one state store (StoredState): rows keyed by model
and token digest, held by the rounds that pin them or by the cache (`cached`). Existing rows are the
cache's. chat's migration 0005 adds the rows of the states rounds keep."""

from django.db import migrations, models

import statecache.models


class Migration(migrations.Migration):
    dependencies = [("statecache", "0001_initial")]

    operations = [
        migrations.RenameModel("SpilledState", "StoredState"),
        migrations.RemoveConstraint(model_name="storedstate", name="unique_spilled_state"),
        migrations.AddConstraint(model_name="storedstate", constraint=models.UniqueConstraint(
            fields=("digest", "state_model"), name="unique_stored_state")),
        migrations.AddField(model_name="storedstate", name="cached", field=models.BooleanField(
            default=True, help_text="held by the shared state cache")),
        migrations.AlterField(model_name="storedstate", name="state", field=models.FileField(
            upload_to=statecache.models.stored_state_path)),
        migrations.AddIndex(model_name="storedstate", index=models.Index(fields=["state"],
                                                                         name="stored_state_blob")),
    ]
