"""Example fedlora methods, one file each, registered through the entry-point group ``fedlora.methods``.

- ``server-momentum``: one rank for every client; the server keeps a velocity (FedAvgM on B and A).
- ``slot-mean``: any rank; each rank slot averaged over the clients that trained it.
- ``mixed-personal``: keeps state on the client; each client starts from a mix of its own factors and the global ones.
"""
