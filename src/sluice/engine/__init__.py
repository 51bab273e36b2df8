"""Our inference engine and the clients the rollout talks to it through."""
