"""PEFT: adapters from the same URIs as models (:mod:`.load`) and tensorized adapter saves (:mod:`.save`)."""
