"""OpenFlow-style flow rules: parsing, matching, actions, and the flow cache."""
