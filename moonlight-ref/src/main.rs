fn main() {
    eprintln!("moonlight-ref is being written (issue 5)");
}
