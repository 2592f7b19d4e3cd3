from django.db import models


class Counter(models.Model):
    """One key's hits in its current window (a rate limit), or its failures (a backoff).

    Kept in the database, not in a process's memory, so that several server
    processes on one database share their limits.
    """

    key = models.CharField(max_length=200, primary_key=True)
    count = models.PositiveIntegerField(default=0)
    window_end = models.DateTimeField(db_index=True)
    blocked_until = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"{self.key}: {self.count}"
