pub async fn run(_dir: &std::path::Path, _size: u64, _files: usize) -> anyhow::Result<()> {
    anyhow::bail!("bench io is not built yet")
}
