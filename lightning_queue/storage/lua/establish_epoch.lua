-- The registry's epoch, created from the proposal if it has none (needs _epoch_prelude).
-- KEYS[1] epoch key; ARGV[1] the proposed epoch id. Returns the epoch.
return establish_epoch(KEYS[1], '', ARGV[1])
