from django.db import models


class ServerInstance(models.Model):
    """A running server process. Its locks live only as long as this row:
    deleting the row of a dead process frees every lock it held (CASCADE)."""

    id = models.CharField(max_length=32, primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started = models.DateTimeField(auto_now_add=True)
    heartbeat = models.DateTimeField()
    # When this process counts as dead unless it beats again: its last heartbeat plus its own
    # RPSERVER_LOCK_DEAD_AFTER_SECONDS. Each process is judged by its own bound, so processes
    # configured differently on one database never take each other for dead while they beat.
    dead_at = models.DateTimeField(db_index=True)

    def __str__(self):
        return f"{self.host}:{self.pid} ({self.id[:8]})"


class Lock(models.Model):
    """A named lock held by one request (`key`) of a live server process (`holder`)."""

    name = models.CharField(max_length=100, unique=True)
    holder = models.ForeignKey(ServerInstance, on_delete=models.CASCADE, related_name="locks")
    key = models.CharField(max_length=32)
    taken = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.name} held by {self.holder}"
