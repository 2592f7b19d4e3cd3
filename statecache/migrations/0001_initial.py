from django.db import migrations, models

import statecache.models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="SpilledState",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("digest", models.CharField(max_length=64)),
                ("state_model", models.CharField(max_length=32)),
                ("tokens", models.PositiveIntegerField(help_text="length of the token prefix")),
                ("nbytes", models.PositiveBigIntegerField()),
                ("state", models.FileField(upload_to=statecache.models.spilled_state_path)),
                ("last_used", models.DateTimeField(db_index=True)),
                ("created", models.DateTimeField(auto_now_add=True)),
            ],
            options={
                "constraints": [models.UniqueConstraint(fields=("digest", "state_model"), name="unique_spilled_state")],
            },
        ),
    ]
