// The Herald SDK as an Android library: the UniFFI-generated Kotlin binding and the
// Rust library built by cargo-ndk, both taken from the repository's bindings/ (run
// `bash bindings/build-android.sh` from the repository root first), plus JNA's AAR
// (JNA with its Android native dispatch libraries; the plain jar has none).
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

val generated = rootDir.resolve("../bindings/generated")
val bindingFile = generated.resolve("kotlin/dev/herald/sdk/herald_ffi.kt")
val jniLibs = generated.resolve("android/jniLibs")
if (!bindingFile.exists() || !jniLibs.resolve("arm64-v8a/libherald_ffi.so").exists()) {
    throw GradleException(
        "Herald binding not built: missing $bindingFile or $jniLibs/<abi>/libherald_ffi.so. " +
            "Run `bash bindings/build-android.sh` from the repository root (needs cargo-ndk and the NDK)."
    )
}

android {
    namespace = "dev.herald.sdk"
    compileSdk = 35
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
    }
    sourceSets["main"].java.srcDir(generated.resolve("kotlin"))
    sourceSets["main"].jniLibs.srcDir(jniLibs)
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    api("net.java.dev.jna:jna:5.14.0@aar")
}
