NAME = "rollout_engine"


def server_name(replica_rank: int, role: str = "", suffix: str = "") -> str:
    """The Ray actor name of a replica's server; the adapter finds its server by it."""
    return f"{NAME}_server_{role + '_' if role else ''}{replica_rank}_0{suffix}"
