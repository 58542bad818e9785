"""The ladder: how a run is protected and comes back, from the cheapest level that holds the newest
step every rank can rebuild (keeper memory, peers' memory, the store). A new recovery level goes here."""
