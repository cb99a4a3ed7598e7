-- When the holder was reminded that this code expires soon: at most once.
ALTER TABLE activation_code ADD COLUMN reminded_at timestamptz;
