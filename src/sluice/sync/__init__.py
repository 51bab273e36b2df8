"""Weight sync trainer -> engines, tagged with the policy version."""
