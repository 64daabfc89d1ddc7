"""The distributed engine: fedblend algorithms as a Flower app (SuperLink + SuperNodes).

- :mod:`.server_app` drives any algorithm through the Flower ``Grid`` with the same server
  loop as the in-process engine (:func:`fedblend.rounds.run_round_loop`) and
  writes the same run directory as ``fedblend run``.
- :mod:`.client_app` runs ``local_update`` / ``finish_client`` / evaluation on the node's
  partition, with the trainer, data and evaluation of the run's modality (text or vision);
  the client's private state stays on the node (``context.state`` plus a safetensors copy
  in the node's state directory) and never crosses the wire.
- :mod:`.wire` is the message contract both sides share (record names, (de)serialisation).
- :mod:`.deploy` starts and stops a loopback SuperLink and SuperNodes (``fedblend deploy``).

Flower is imported lazily by the app modules only, so the rest of fedblend does not need it.
"""
