fn main() {
    println!("walagent: not yet");
}
