"""The fitted objects a head file holds: head, neighbourhood graph, novelty model, Probe."""
