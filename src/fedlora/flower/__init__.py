"""fedlora over Flower: the same methods, the same client trainer, many machines.

- ``records``: ClientPlan / ClientUpdate ↔ Flower records (the wire format; pure).
- ``client_app``: the ClientApp (roll call; train = client hooks around LocalTrainer.fit).
- ``state``: a client's persistent base on node-local disk (safetensors + JSON).
- ``roster``: which SuperNode holds which partition (the server asks).
- ``strategy``: the Strategy, delegating to the method object the simulator uses.
- ``server_app``: the ServerApp (config, roll call, setup, Strategy.start, run folder).
- ``launch``: a SuperLink and N SuperNodes on one machine, then ``flwr run``.
- ``app/``: the Flower app folder (one pyproject.toml) that ``flwr run`` ships.

Nothing here is imported by the rest of fedlora; ``flwr`` is an optional dependency.
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower app folder to pass to ``flwr run``."""
