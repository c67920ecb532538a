"""The trajectory viewer: rollout records (:mod:`.records`) and the static HTML report (:mod:`.report`)."""
