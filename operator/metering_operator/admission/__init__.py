"""Enforcement inside the API server: admission policies that hold while the operator is down.

The operator's own checks run in its process; a buyer with ordinary namespace rights could
otherwise race it, remove the gate, forge its annotations or relabel pods while it is stopped.
These policies are evaluated by the API server itself on every write (CEL, no webhook):

* :mod:`.cel` -- the CEL text of every policy (one source of truth, pure data);
* :mod:`.objects` -- the ValidatingAdmissionPolicy / MutatingAdmissionPolicy objects and
  bindings for one install (the chart renders the same fragments, see ``metering-operator
  manifests``);
* :mod:`.install` -- local mode: find who the operator runs as, and apply them.
"""
