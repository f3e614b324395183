"""The web console: server-rendered pages over the registry, served by ``edgefleet cloud api`` at ``/``."""
