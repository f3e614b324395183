"""``edgefleet broker run``: mosquitto whose users and ACLs follow the registry.

- ``config``: mosquitto.conf, password and ACL files rendered from an ``AuthSnapshot`` (pure).
- ``sync``: reads the snapshot from the registry, writes the files atomically, reloads on change.
- ``claim_bridge``: answers claim-token requests with ``cloud.fleet.claims.handle_claim``.
- ``run``: ``BrokerRunner``: the mosquitto child process, the sync loop and the claim handler.
- ``certs``: a test / development PKI (CA, server and client certificates).
"""
